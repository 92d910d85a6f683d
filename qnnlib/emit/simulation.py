"""A simulation model whose quantisation parameters are inputs: one session, any configuration.

Every quantised activation tensor ``t`` of tied group ``g`` is replaced, for all its readers, by

    t_fq = Where(on_g, (Clip(Round(t / s_g) + z_g, qmin_g, qmax_g) - z_g) * s_g, t)

where ``s_g``, ``z_g``, ``qmin_g``, ``qmax_g`` (float32 scalars) and ``on_g`` (bool scalar) are graph
inputs. So one onnxruntime session evaluates any scale, zero point, bit width, or on/off choice of
any group without rebuilding the model. ``Round`` rounds half to even like QuantizeLinear.

Weights and biases are the plan's quantised values, dequantised, as constants; or, with
``weight_switches=True``, each planned weight ``W`` of a layer becomes a quantisation point of its own,

    W_fq = Where(on_w, clip(Round(W / s_w), -qmax_w, qmax_w) * s_w, W)

with the per-channel scales ``s_w`` (shaped to broadcast along the channel axis), ``-qmax_w``,
``qmax_w`` and ``on_w`` as inputs, so any bit width of any layer's weights is one feed away; biases
then stay float, with the plan's bias correction (their int32 rounding is far below any weight
precision's).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qnnlib.emit.qdq import CONTRIB_DOMAIN
from qnnlib.graph.edit import ensure_opset, replace_nodes
from qnnlib.graph.index import GraphIndex
from qnnlib.graph.names import NameAllocator
from qnnlib.numerics import affine
from qnnlib.numerics.qtypes import FLOAT, qtype
from qnnlib.plan import ActivationParams, GroupPlan, QuantPlan, WeightPlan

#: The graph inputs of one group, in this order: scale, zero point, qmin, qmax, on.
PARAMETER_FIELDS = ("scale", "zero_point", "qmin", "qmax", "on")
#: A weight quantisation point: the layer's node name and the input index the weight enters at.
WeightKey = tuple[str, int]


@dataclass(frozen=True)
class Simulation:
    """The simulation model, the names of each group's parameter inputs, and each tensor's simulated name."""

    model: onnx.ModelProto
    inputs: dict[int, tuple[str, str, str, str, str]]
    simulated: dict[str, str]
    weight_inputs: dict[WeightKey, tuple[str, str, str, str, str]] = field(default_factory=dict)
    weight_shapes: dict[WeightKey, tuple[int, ...]] = field(default_factory=dict)

    def feeds(self, params: Mapping[int, ActivationParams], enabled: Container[int]) -> dict[str, np.ndarray]:
        """Parameter inputs for ``params`` (every group); groups not in ``enabled`` pass values through."""
        feeds: dict[str, np.ndarray] = {}
        for gid, names in self.inputs.items():
            p = params[gid]
            on = gid in enabled and p.qtype != FLOAT
            qt = qtype(p.qtype) if p.qtype != FLOAT else None
            values = (p.scale, p.zero_point, qt.qmin if qt else 0, qt.qmax if qt else 0)
            for name, value in zip(names[:4], values, strict=True):
                feeds[name] = np.array(value, np.float32)
            feeds[names[4]] = np.array(on)
        return feeds

    def weight_feeds(self, choices: Mapping[WeightKey, tuple[np.ndarray, int] | None]) -> dict[str, np.ndarray]:
        """Parameter inputs of the weight quantisation points (``weight_switches=True``).

        ``choices`` maps ``(node, input index)`` to ``(per-channel scales, qmax)`` or None (float
        weights); a weight not in ``choices`` stays float.
        """
        feeds: dict[str, np.ndarray] = {}
        for key, (scale, zero, qmin, qmax, on) in self.weight_inputs.items():
            choice = choices.get(key)
            shape = self.weight_shapes[key]
            scales = np.ones(shape, np.float32) if choice is None else np.asarray(choice[0], np.float32).reshape(shape)
            bound = 0 if choice is None else int(choice[1])
            feeds[scale] = scales
            feeds[zero] = np.array(0, np.float32)
            feeds[qmin] = np.array(-bound, np.float32)
            feeds[qmax] = np.array(bound, np.float32)
            feeds[on] = np.array(choice is not None)
        return feeds


def build_simulation(model: onnx.ModelProto, plan: QuantPlan, *, weight_switches: bool = False) -> Simulation:
    """The simulation model of ``plan`` over ``model`` (the normalised float model, unchanged).

    ``weight_switches``: weights as quantisation points with their parameters as inputs (see the
    module docstring) instead of the plan's dequantised constants.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    index = GraphIndex(out)
    names = NameAllocator(out)
    inputs = {group.id: _parameter_inputs(out, names, f"qnnlib_sim_g{group.id}", []) for group in plan.groups}
    after: dict[int, list[onnx.NodeProto]] = {}
    head: list[onnx.NodeProto] = []
    weight_inputs: dict[WeightKey, tuple[str, str, str, str, str]] = {}
    weight_shapes: dict[WeightKey, tuple[int, ...]] = {}
    if weight_switches:
        for key, (chain, params, shape) in _weight_points(out, index, plan, names).items():
            head.extend(chain)
            weight_inputs[key], weight_shapes[key] = params, shape
    else:
        _dequantised_weights(out, index, plan, names)
    simulated = _activation_points(out, index, plan.groups,
                                   lambda g, t, result: fake_quant_nodes(t, inputs[g.id], names.fresh, result=result),
                                   names, head=head, after=after)
    _assemble(out, index, simulated, head, after)
    if not any(o.domain in ("", "ai.onnx") and o.version >= 13 for o in out.opset_import):
        raise ValueError("the simulation model needs opset 13 or later (Round, Clip with inputs)")
    return Simulation(out, inputs, simulated, weight_inputs, weight_shapes)


def _parameter_inputs(model: onnx.ModelProto, names: NameAllocator, prefix: str,
                      scale_shape: list[int]) -> tuple[str, str, str, str, str]:
    """Add the graph inputs of one quantisation point (:data:`PARAMETER_FIELDS`); return their names."""
    params: tuple[str, str, str, str, str] = tuple(  # type: ignore[assignment]
        names.fresh(f"{prefix}_{field}") for field in PARAMETER_FIELDS)
    model.graph.input.append(helper.make_tensor_value_info(params[0], TensorProto.FLOAT, scale_shape))
    for name in params[1:4]:
        model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, []))
    model.graph.input.append(helper.make_tensor_value_info(params[4], TensorProto.BOOL, []))
    return params


#: Writes one quantisation point: ``(group, tensor read, result name or None for a fresh one) -> (nodes, result)``.
PointMaker = Callable[[GroupPlan, str, str | None], tuple[list[onnx.NodeProto], str]]


def _activation_points(model: onnx.ModelProto, index: GraphIndex, groups: Iterable[GroupPlan], point: PointMaker,
                       names: NameAllocator, *, head: list[onnx.NodeProto],
                       after: dict[int, list[onnx.NodeProto]]) -> dict[str, str]:
    """Make every member of ``groups`` a quantisation point written by ``point``; return each member's simulated name.

    A point's nodes go to ``head`` when the member has no producer (a model input, a constant), else
    to ``after[id(producer)]``.
    """
    outputs = {o.name for o in model.graph.output}
    simulated: dict[str, str] = {}
    for group in groups:
        for member in group.members:
            producer = index.producer(member)
            if producer is None and member not in index.graph_inputs and not index.is_constant(member):
                continue
            if producer is not None and member in outputs:
                # a graph output keeps its name and carries the simulated value, as in the QDQ model
                raw = names.fresh(f"{member}_float")
                producer.output[list(producer.output).index(member)] = raw
                chain, simulated[member] = point(group, raw, member)
            else:
                chain, simulated[member] = point(group, member, None)
            (after.setdefault(id(producer), []) if producer is not None else head).extend(chain)
    return simulated


def _assemble(model: onnx.ModelProto, index: GraphIndex, simulated: Mapping[str, str], head: list[onnx.NodeProto],
              after: Mapping[int, list[onnx.NodeProto]]) -> None:
    """Point every reader of a member at its simulated name; order ``head``, then each node and its points."""
    for node in index.nodes:
        node.input[:] = [simulated.get(name, name) for name in node.input]
    nodes = list(head)
    for node in index.nodes:
        nodes.append(node)
        nodes.extend(after.get(id(node), ()))
    replace_nodes(model, nodes)


def fake_quant_nodes(tensor: str, params: Sequence[str], fresh: Callable[[str], str],
                     result: str | None = None) -> tuple[list[onnx.NodeProto], str]:
    """The nodes computing ``Where(on, (clip(round(t / s) + z, qmin, qmax) - z) * s, t)``; ``fresh`` makes names.

    ``params`` are the names of the scale, zero point, qmin, qmax and on inputs; ``result`` names
    the output (a fresh name by default).
    """
    scale, zero, qmin, qmax, on = params
    base = f"{tensor}_sim"
    steps = [("Div", [tensor, scale]), ("Round", None), ("Add", [None, zero]), ("Clip", [None, qmin, qmax]),
             ("Sub", [None, zero]), ("Mul", [None, scale])]
    nodes: list[onnx.NodeProto] = []
    previous = tensor
    for op, args in steps:
        output = fresh(f"{base}_{op.lower()}")
        inputs = [previous] if args is None else [previous if a is None else a for a in args]
        nodes.append(helper.make_node(op, inputs, [output], name=fresh(f"{output}_node")))
        previous = output
    result = result if result is not None else fresh(base)
    nodes.append(helper.make_node("Where", [on, previous, tensor], [result], name=fresh(f"{result}_node")))
    return nodes, result


_WeightPoint = tuple[list[onnx.NodeProto], tuple[str, str, str, str, str], tuple[int, ...]]


def _weight_points(model: onnx.ModelProto, index: GraphIndex, plan: QuantPlan,
                   names: NameAllocator) -> dict[WeightKey, _WeightPoint]:
    """Make each planned weight a quantisation point with its parameters as graph inputs.

    Returns, per weight, the nodes computing it, its parameter inputs' names and its scale's shape.
    """
    nodes = {n.name: n for n in model.graph.node}
    points: dict[WeightKey, _WeightPoint] = {}
    for wp in plan.weights:
        if wp.kind != "weight":
            if wp.correction:  # a corrected bias keeps its correction, in float
                name = names.fresh(f"{wp.tensor}_corrected")
                model.graph.initializer.append(numpy_helper.from_array(wp.corrected(index.constant(wp.tensor)), name))
                nodes[wp.node].input[wp.input_index] = name
            continue
        key = (wp.node, wp.input_index)
        value = index.constant(wp.tensor)
        shape = [1] * value.ndim
        if wp.axis is not None and len(wp.scales) > 1:
            shape[wp.axis % value.ndim] = value.shape[wp.axis % value.ndim]
        params = _parameter_inputs(model, names, f"qnnlib_sim_w_{wp.node}_{wp.input_index}", shape)
        chain, simulated = fake_quant_nodes(wp.tensor, params, names.fresh)
        nodes[wp.node].input[wp.input_index] = simulated
        points[key] = (chain, params, tuple(shape))
    return points


def _dequantised_weights(model: onnx.ModelProto, index: GraphIndex, plan: QuantPlan, names: NameAllocator) -> None:
    """Replace each planned weight and bias input by its quantised-then-dequantised value."""
    nodes = {n.name: n for n in model.graph.node}
    for wp in plan.weights:
        node = nodes[wp.node]
        value = dequantised_weight(index.constant(wp.tensor), wp)
        name = names.fresh(f"{wp.tensor}_simulated")
        model.graph.initializer.append(numpy_helper.from_array(value, name))
        node.input[wp.input_index] = name


def dequantised_weight(value: np.ndarray, wp: WeightPlan) -> np.ndarray:
    """The float value a planned weight or bias stands for after quantisation (correction included)."""
    value = wp.corrected(value)
    scales = np.asarray(wp.scales, np.float32)
    if wp.kind == "bias":
        q, _ = affine.quantize_bias(value.reshape(-1), scales)
        return (q.astype(np.float64) * scales).astype(np.float32).reshape(value.shape)
    axis = wp.axis if scales.size > 1 else None
    shaped = scales if axis is not None else scales.reshape(())
    q = affine.quantize_weight(value, shaped, axis, qtype(wp.qtype), wp.qmax)
    return affine.dequantize(q, shaped, 0, axis)


@dataclass(frozen=True)
class SwitchedPlan:
    """The plan's quantisation with one on/off input per group and per weight (see :func:`build_switched`)."""

    model: onnx.ModelProto
    groups: dict[int, str]
    weights: dict[WeightKey, str]

    def feeds(self, off_groups: Container[int] = (), off_weights: Container[WeightKey] = ()) -> dict[str, np.ndarray]:
        """Every switch on (quantised as planned) but those of ``off_groups`` and ``off_weights`` (float)."""
        return {**{name: np.array(gid not in off_groups) for gid, name in self.groups.items()},
                **{name: np.array(key not in off_weights) for key, name in self.weights.items()}}


def build_switched(model: onnx.ModelProto, plan: QuantPlan) -> SwitchedPlan:
    """``plan`` over ``model`` (unchanged) with its parameters fixed and each point switchable to float.

    Every quantised member ``t`` of group ``g`` is read as ``If(on_g, DQ(Q(t)), t)``, with the group's
    planned scale and zero point as constants: onnxruntime's own QuantizeLinear and DequantizeLinear
    round, as in the QDQ model. Every planned weight is ``If(on_w, W_planned, W)`` between two
    constants, its dequantised planned value and its float value; its layer's bias switches with it,
    between its planned (corrected, int32-rounded) value and its float value. ``on_*`` are bool
    scalar inputs. ``If`` runs one branch, so a point costs its Q/DQ pair and little more: about a
    quarter of a :func:`build_simulation` run with weight switches on the PP-OCRv5 recogniser,
    whose ``Where`` and six-op rounding chain dominate. Switching a point off stands for raising
    it: 16 bits over twice the observed extent round about 128 times finer than 8 bits, some 40 dB
    below; a layer raised or kept float loses its 8-bit bias correction, and so does a switched-off one.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    index = GraphIndex(out)
    names = NameAllocator(out)
    head: list[onnx.NodeProto] = []
    weights = _switched_weights(out, index, plan, names, head)
    quantised = [g for g in plan.groups if g.params.qtype != FLOAT]
    groups = {g.id: _switch_input(out, names, f"qnnlib_switch_g{g.id}") for g in quantised}
    quantise = {g.id: _quantise(out, names, g) for g in quantised}

    def point(group: GroupPlan, tensor: str, result: str | None) -> tuple[list[onnx.NodeProto], str]:
        chain, dq = quantise[group.id](tensor)
        result = result if result is not None else names.fresh(f"{tensor}_switched")
        return [_if(groups[group.id], chain, dq, tensor, result=result, names=names)], result

    after: dict[int, list[onnx.NodeProto]] = {}
    simulated = _activation_points(out, index, quantised, point, names, head=head, after=after)
    _assemble(out, index, simulated, head, after)
    ensure_opset(out, CONTRIB_DOMAIN)
    return SwitchedPlan(out, groups, weights)


def _switch_input(model: onnx.ModelProto, names: NameAllocator, prefix: str) -> str:
    """A new bool scalar graph input."""
    name = names.fresh(f"{prefix}_on")
    model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.BOOL, []))
    return name


def _constant(model: onnx.ModelProto, names: NameAllocator, base: str, value: np.ndarray) -> str:
    """A new initializer holding ``value``."""
    name = names.fresh(base)
    model.graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _if(condition: str, then: list[onnx.NodeProto], then_output: str, otherwise: str, *, result: str,
        names: NameAllocator) -> onnx.NodeProto:
    """``result = If(condition, then_output computed by then, a copy of otherwise)``."""
    copy = names.fresh(f"{otherwise}_copy")
    else_branch = [helper.make_node("Identity", [otherwise], [copy], name=names.fresh(f"{copy}_node"))]

    def branch(nodes: list[onnx.NodeProto], output: str) -> onnx.GraphProto:
        return helper.make_graph(nodes, names.fresh(f"{result}_branch"), [],
                                 [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)])

    return helper.make_node("If", [condition], [result], name=names.fresh(f"{result}_node"),
                            then_branch=branch(then, then_output), else_branch=branch(else_branch, copy))


def _quantise(model: onnx.ModelProto, names: NameAllocator,
              group: GroupPlan) -> Callable[[str], tuple[list[onnx.NodeProto], str]]:
    """A maker of ``DQ(Q(t))`` nodes at ``group``'s planned parameters (constants added to ``model``)."""
    p, qt = group.params, qtype(group.params.qtype)
    scale = _constant(model, names, f"qnnlib_switch_g{group.id}_scale", np.array(p.scale, np.float32))
    zero = names.fresh(f"qnnlib_switch_g{group.id}_zero_point")
    model.graph.initializer.append(helper.make_tensor(zero, qt.onnx_type, [], [int(p.zero_point)]))
    domain = "" if qt.name in ("uint8", "int8") else CONTRIB_DOMAIN  # 4 and 16 bits: the contrib ops

    def make(tensor: str) -> tuple[list[onnx.NodeProto], str]:
        q, dq = names.fresh(f"{tensor}_switched_q"), names.fresh(f"{tensor}_switched_dq")
        return [helper.make_node("QuantizeLinear", [tensor, scale, zero], [q], name=names.fresh(f"{q}_node"),
                                 domain=domain),
                helper.make_node("DequantizeLinear", [q, scale, zero], [dq], name=names.fresh(f"{dq}_node"),
                                 domain=domain)], dq

    return make


def _switched_weights(model: onnx.ModelProto, index: GraphIndex, plan: QuantPlan, names: NameAllocator,
                      head: list[onnx.NodeProto]) -> dict[WeightKey, str]:
    """Replace each planned weight input by its switch (its nodes appended to ``head``).

    A bias follows its layer's weight switch: off, the layer's bias is the float one, as a layer
    raised to 16 bits or kept float gets no 8-bit bias correction (:func:`qnnlib.planner.build_plan`).
    A bias whose layer has no planned weight is its planned value.
    """
    nodes = {n.name: n for n in index.nodes}
    switches: dict[WeightKey, str] = {}
    by_node: dict[str, str] = {}
    ordered = sorted(plan.weights, key=lambda wp: wp.kind != "weight")  # weights first: biases read their switch
    for wp in ordered:
        planned = _constant(model, names, f"{wp.tensor}_planned", dequantised_weight(index.constant(wp.tensor), wp))
        if wp.kind == "weight":
            key = (wp.node, wp.input_index)
            switches[key] = by_node[wp.node] = _switch_input(
                model, names, f"qnnlib_switch_w_{wp.node}_{wp.input_index}")
        elif wp.node not in by_node:
            nodes[wp.node].input[wp.input_index] = planned
            continue
        chosen = names.fresh(f"{wp.tensor}_switched")
        copy = names.fresh(f"{planned}_copy")
        then = [helper.make_node("Identity", [planned], [copy], name=names.fresh(f"{copy}_node"))]
        head.append(_if(by_node[wp.node], then, copy, wp.tensor, result=chosen, names=names))
        nodes[wp.node].input[wp.input_index] = chosen
    return switches
