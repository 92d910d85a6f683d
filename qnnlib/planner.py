"""Build the quantisation plan from the selection, the tied groups and calibration ranges.

* A group's range is the union of its members' calibrated ranges (constants contribute their
  min and max); an override on any member fixes the whole group.
* Activation parameters come from :func:`qnnlib.numerics.affine.activation_qparams`.
* Weights are symmetric per output channel; a bias is int32 at ``s_in * s_w[c]`` and values that
  overflow int32 are clamped and counted.
* A foldable Relu or Clip is dropped where its group's representable range lies within its
  bounds (within half a step), i.e. where clipping to the quantisation range is the same function.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from qnnlib.config import QuantConfig, TensorOverride
from qnnlib.errors import ConfigError
from qnnlib.graph.index import GraphIndex
from qnnlib.graph.rules import RULES, clip_bounds, data_inputs
from qnnlib.graph.select import BIAS, WEIGHT, Selection
from qnnlib.graph.tying import TiedGroup
from qnnlib.numerics import affine
from qnnlib.numerics.qtypes import FLOAT, precision_name, qtype
from qnnlib.plan import ActivationParams, GroupPlan, LayerPlan, QuantPlan, WeightPlan

log = logging.getLogger(__name__)


def group_range(group: TiedGroup, ranges: Mapping[str, tuple[float, float]], index: GraphIndex) -> tuple[float, float]:
    """Union of the members' ranges; constants give their own min and max; (0, 0) if none is known."""
    lo, hi = np.inf, -np.inf
    for member in group.members:
        if index.is_constant(member):
            value = index.constant(member).astype(np.float32)
            if value.size:
                lo, hi = min(lo, float(value.min())), max(hi, float(value.max()))
        elif member in ranges:
            mlo, mhi = ranges[member]
            if mlo <= mhi:
                lo, hi = min(lo, mlo), max(hi, mhi)
    if lo > hi:
        return 0.0, 0.0
    return float(lo), float(hi)


def _group_override(group: TiedGroup, overrides: Mapping[str, TensorOverride]) -> tuple[str, TensorOverride] | None:
    hits = [(m, overrides[m]) for m in group.members if m in overrides]
    if len({o for _, o in hits}) > 1:
        names = ", ".join(repr(m) for m, _ in hits)
        raise ConfigError(
            f"tensors {names} are tied (they must share parameters) but have different overrides; "
            "give one override for the group"
        )
    return hits[0] if hits else None


@dataclass(frozen=True)
class GroupChoice:
    """A later decision about one tied group that replaces calibration's: a range, a type, or both.

    ``qtype`` is a storage type name (``"uint16"`` for a raised group) or ``"float"``.
    """

    range: tuple[float, float] | None = None
    qtype: str | None = None
    source: str = "optimized"


def group_params(group: TiedGroup, ranges: Mapping[str, tuple[float, float]], index: GraphIndex,
                 config: QuantConfig, choice: GroupChoice | None = None) -> ActivationParams:
    """The shared parameters of one group, from an override, a later choice, or the members' ranges."""
    if choice is not None and choice.qtype == FLOAT:
        lo, hi = choice.range or group_range(group, ranges, index)
        return ActivationParams(FLOAT, 1.0, 0, (float(lo), float(hi)), choice.source)
    qt = qtype(choice.qtype if choice is not None and choice.qtype else config.activation_type)
    hit = _group_override(group, config.overrides)
    if hit is not None and hit[1].scale is not None:
        override = hit[1]
        zp = int(override.zero_point)  # type: ignore[arg-type]
        if not qt.qmin <= zp <= qt.qmax:
            raise ConfigError(f"override zero_point {zp} for {hit[0]!r} is outside {qt.name} [{qt.qmin}, {qt.qmax}]")
        scale = np.float32(override.scale)
        return ActivationParams(qt.name, float(scale), zp, affine.representable_range(scale, zp, qt), "override")
    if hit is not None:
        lo, hi = hit[1].range  # type: ignore[misc]
        source = "override"
    elif choice is not None and choice.range is not None:
        lo, hi = choice.range
        source = choice.source
    else:
        lo, hi = group_range(group, ranges, index)
        source = choice.source if choice is not None else "calibrated"
    scale, zp = affine.activation_qparams(lo, hi, qt, symmetric=config.activation_symmetric)
    return ActivationParams(qt.name, float(scale), int(zp), (float(lo), float(hi)), source)


def build_plan(index: GraphIndex, selection: Selection, groups: tuple[TiedGroup, ...],
               ranges: Mapping[str, tuple[float, float]], config: QuantConfig,
               choices: Mapping[int, GroupChoice] | None = None) -> QuantPlan:
    """Decide every parameter; see the module docstring. ``choices`` replace groups' calibrated ones."""
    choices = choices or {}
    group_plans = tuple(
        GroupPlan(g.id, g.members, tuple(dict.fromkeys(t.node for t in g.ties)),
                  group_params(g, ranges, index, config, choices.get(g.id)))
        for g in groups
    )
    plan_groups = {m: gp for gp in group_plans for m in gp.members}
    weights = _weight_plans(index, selection, plan_groups, config)
    layers = []
    nodes = {n.name: n for n in index.nodes}
    for name in selection.layers:
        node = nodes[name]
        rule = RULES[node.op_type]
        inputs = tuple(t for _, t in data_inputs(node, rule) if t in plan_groups)
        outputs = tuple(o for o in node.output if o in plan_groups)
        widths = {precision_name(plan_groups[t].params.qtype) for t in inputs + outputs} or {"int8"}
        precision = next(p for p in (FLOAT, "int16", "int8") if p in widths)
        layers.append(LayerPlan(name, node.op_type, precision, inputs, outputs))
    dropped = tuple(
        name for name in selection.foldable
        if _fold_is_exact(nodes[name], plan_groups[nodes[name].output[0]].params, index)
    )
    return QuantPlan(config.activation_type, config.weight_type, group_plans, weights, tuple(layers), dropped)


def _fold_is_exact(node: onnx.NodeProto, params: ActivationParams, index: GraphIndex) -> bool:
    """Whether clipping to the representable range reproduces the Relu/Clip (to half a step)."""
    if params.qtype == FLOAT:
        return False
    if node.op_type == "Relu":
        bound_lo, bound_hi = 0.0, np.inf
    else:
        bound_lo, bound_hi = clip_bounds(node, index)
    qt = qtype(params.qtype)
    lo, hi = affine.representable_range(params.scale, params.zero_point, qt)
    half = params.scale / 2
    return lo >= bound_lo - half and hi <= bound_hi + half


def _overflow_fix_applies(node: onnx.NodeProto, index: GraphIndex, groups: Mapping[str, GroupPlan],
                          config: QuantConfig) -> bool:
    """Whether ``node``'s weights get 7 bits of range (``QuantConfig.overflow_fix``).

    "enable": every weighted layer; "first_layer": layers whose activation input is tied to a graph
    input (raw images and audio fill the whole uint8 range, where saturation bites most); "disable": none.
    """
    if config.overflow_fix == "enable":
        return True
    if config.overflow_fix == "disable":
        return False
    group = groups.get(node.input[0])
    return group is not None and any(_from_model_input(m, index) for m in group.members)


#: Ops that carry a model input's values unchanged (or only retyped) to the first layer.
_INPUT_CARRIERS = frozenset({"Cast", "Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})


def _from_model_input(tensor: str, index: GraphIndex) -> bool:
    """Whether ``tensor`` is a graph input, or one seen through Casts and reshapes (a float16 model's input)."""
    while tensor not in index.graph_inputs:
        producer = index.producer(tensor)
        if producer is None or producer.op_type not in _INPUT_CARRIERS:
            return False
        tensor = producer.input[0]
    return True


def _integer_kernel_input(node: onnx.NodeProto, groups: Mapping[str, GroupPlan]) -> bool:
    """Whether the layer's activation input is 8-bit, so that onnxruntime runs it on an integer kernel.

    Only then is its bias quantised to int32; a 16-bit or float input keeps a float bias.
    """
    operands = [groups.get(t) for t in node.input[:2] if t in groups] or [None]
    return all(g is not None and precision_name(g.params.qtype) == "int8" for g in operands)


def _weight_plans(index: GraphIndex, selection: Selection, groups: Mapping[str, GroupPlan],
                  config: QuantConfig) -> tuple[WeightPlan, ...]:
    wqt = qtype(config.weight_type)
    nodes = {n.name: n for n in index.nodes}
    plans: list[WeightPlan] = []
    weight_scales: dict[str, np.ndarray] = {}
    biases = {s.node: s for s in selection.weights if s.kind == BIAS}
    for slot in selection.weights:
        if slot.kind != WEIGHT:
            continue
        node = nodes[slot.node]
        w = index.constant(slot.tensor).astype(np.float32)
        if not np.isfinite(w).all():
            raise ConfigError(
                f"weight {slot.tensor!r} of node {slot.node!r} holds NaN or inf; fix the model, or keep the "
                f"node in float with QuantConfig(exclude=({slot.node!r},))"
            )
        qmax = affine.OVERFLOW_SAFE_QMAX if _overflow_fix_applies(node, index, groups, config) else wqt.qmax
        scales = affine.weight_scales(w, slot.axis, qmax)
        bias_slot = biases.get(slot.node) if _integer_kernel_input(node, groups) else None
        if bias_slot is not None and slot.axis is not None:
            s_in = np.float32(groups[node.input[0]].params.scale)
            scales = affine.bias_safe_scales(scales, w, slot.axis, index.constant(bias_slot.tensor), s_in)
        weight_scales[slot.node] = scales
        plans.append(WeightPlan(slot.node, slot.input_index, slot.tensor, WEIGHT, wqt.name, slot.axis,
                                tuple(float(s) for s in scales), qmax=qmax))
    for slot in selection.weights:
        if slot.kind != BIAS or not _integer_kernel_input(nodes[slot.node], groups):
            continue
        node = nodes[slot.node]
        s_in = np.float32(groups[node.input[0]].params.scale)
        if slot.node in weight_scales:
            s_w = weight_scales[slot.node]
        else:  # Gemm whose B is an activation: its group's scale
            s_w = np.array([groups[node.input[1]].params.scale], np.float32)
        b = index.constant(slot.tensor).astype(np.float32).reshape(-1)
        if not np.isfinite(b).all():
            raise ConfigError(
                f"bias {slot.tensor!r} of node {slot.node!r} holds NaN or inf; fix the model, or keep the "
                f"node in float with QuantConfig(exclude=({slot.node!r},))"
            )
        scales = affine.bias_scales(s_in, s_w)
        if scales.size == 1 and b.size > 1:
            scales = np.full(b.shape, scales[0], np.float32)
        _, clamped = affine.quantize_bias(b, scales)
        if clamped:
            log.warning("bias %r of node %r: %d values overflow int32 and are clamped", slot.tensor, slot.node, clamped)
        plans.append(WeightPlan(slot.node, slot.input_index, slot.tensor, BIAS, "int32", 0,
                                tuple(float(s) for s in scales), clamped))
    return tuple(plans)
