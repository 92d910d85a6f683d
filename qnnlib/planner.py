"""Build the quantisation plan from the selection, the tied groups and calibration ranges.

* A group's range is the union of its members' calibrated ranges (constants contribute their
  min and max); an override on any member fixes the whole group.
* Activation parameters come from :func:`qnnlib.numerics.affine.activation_qparams`.
* ``QuantConfig.power_of_two_scales``: activation scales are rounded up to powers of two, weight
  scales per channel to the power of two of least error; bias scales ``s_in * s_w`` follow.
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
from qnnlib.graph.index import GraphIndex, attribute
from qnnlib.graph.rules import RULES, clip_bounds, data_inputs
from qnnlib.graph.select import BIAS, WEIGHT, Selection, WeightSlot
from qnnlib.graph.tying import TiedGroup
from qnnlib.numerics import affine
from qnnlib.numerics.qtypes import FLOAT, QType, precision_name, qtype
from qnnlib.plan import SOFTMAX_SOURCE, ActivationParams, GroupPlan, LayerPlan, QuantPlan, WeightPlan

#: Weight type of a layer raised to 16 bits.
WIDE_WEIGHT = "int16"
#: Weight type of a layer lowered to 4 bits.
NARROW_WEIGHT = "int4"

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
    rows = _softmax_rows(group, index) if hit is None and qt.bits == 8 else []
    if rows:
        return _softmax_params(group_range(group, ranges, index), qt, symmetric=config.activation_symmetric,
                               power_of_two=config.power_of_two_scales, row=min(rows))
    if hit is not None:
        lo, hi = hit[1].range  # type: ignore[misc]
        source = "override"
    elif choice is not None and choice.range is not None:
        lo, hi = choice.range
        source = choice.source
    else:
        lo, hi = group_range(group, ranges, index)
        source = choice.source if choice is not None else "calibrated"
    scale, zp = affine.activation_qparams(lo, hi, qt, symmetric=config.activation_symmetric,
                                          power_of_two=config.power_of_two_scales)
    return ActivationParams(qt.name, float(scale), int(zp), (float(lo), float(hi)), source)


#: QLinearSoftmax (onnxruntime 1.31) computes ``p * floor(1 / s)`` in float32 from exponentials scaled
#: up to ``FLT_MAX / (e^5 * D)`` for rows of ``D`` values, so ``floor(1 / s)`` above ``e^5 * D`` (148 D)
#: overflows to inf and the row comes out 0 (measured: the limit is 148.4 D for D from 2 to 1024). A
#: Softmax output's grid may be finer than 1/256 by at most this factor of ``D``, less than half the limit.
SOFTMAX_STEPS_PER_ROW_VALUE = 64


def _softmax_rows(group: TiedGroup, index: GraphIndex) -> list[int]:
    """The row length (axis size) of every Softmax writing a member; 0 where the shape is not known.

    Empty when no Softmax writes a member.
    """
    rows = []
    for member in group.members:
        node = index.producer(member)
        if node is None or node.op_type != "Softmax":
            continue
        shape = index.shape(node.input[0])
        size = 0
        if shape:
            axis = int(attribute(node, "axis", -1))
            dim = shape[axis] if -len(shape) <= axis < len(shape) else None
            size = dim if isinstance(dim, int) and dim > 0 else 0
        rows.append(size)
    return rows


def softmax_steps(hi: float, row: int, qmax: int, *, power_of_two: bool) -> int:
    """``N``, the steps per unit of an unsigned 8-bit Softmax output grid ``s = 1/N``.

    ``N = floor(qmax / hi)``, so that the grid reaches the observed maximum ``hi``, kept within
    ``[256, SOFTMAX_STEPS_PER_ROW_VALUE * row]``: never coarser than onnxruntime's quantiser's 1/256,
    never past the point where QLinearSoftmax overflows. Rows of unknown length get 256. With
    ``power_of_two`` N is rounded down to a power of two.
    """
    steps = 256
    if row > 0 and hi > 0.0:
        steps = max(256, min(int(qmax / hi), SOFTMAX_STEPS_PER_ROW_VALUE * row))
    if power_of_two:
        steps = 1 << (steps.bit_length() - 1)
    return steps


def reciprocal_scale(steps: int) -> np.float32:
    """The float32 ``s`` nearest ``1/N`` with ``floor(1 / s) == N`` in float32.

    QLinearSoftmax quantises with ``floor(1 / s)`` steps per unit rather than ``1 / s``; for
    ``N = 1000``, ``float32(1/1000)`` gives 999. The scale is nudged down by ulps until the kernel's
    step count and the QuantizeLinear it replaces agree.
    """
    scale = np.float32(1.0 / steps)
    while np.floor(np.float32(1.0) / scale) < steps:
        scale = np.nextafter(scale, np.float32(0.0))
    return np.float32(scale)


def _softmax_params(observed: tuple[float, float], qt: QType, *, symmetric: bool,
                    power_of_two: bool, row: int) -> ActivationParams:
    """The 8-bit parameters of a group holding a Softmax output: its grid starts at 0.

    onnxruntime fuses DequantizeLinear, Softmax, QuantizeLinear into QLinearSoftmax. A group within
    [0, 1] gets the grid ``s = 1/N``, ``z = qmin`` with ``N`` from :func:`softmax_steps`: 1/256
    (onnxruntime's quantiser's grid) when the outputs reach 1, finer when long rows keep every
    probability small (rows of 1024 values, probabilities below 0.01: at 1/256 most of them round
    to 0 and the readers see nothing). Symmetric int8 keeps ``1/128, z = 0``, and signed int8
    keeps ``1/256``: its kernel wraps values past 127 instead of clamping them, so a grid that
    stops short of the largest probability is unsafe there. A group whose other members reach
    outside [0, 1] (a Concat with other inputs) gets its observed range widened to cover [0, 1].
    """
    lo, hi = observed
    if lo >= 0.0 and hi <= 1.0:
        if symmetric:
            scale, zero = np.float32(1.0 / 128), 0
        elif qt.qmin == 0:
            scale, zero = reciprocal_scale(softmax_steps(hi, row, qt.qmax, power_of_two=power_of_two)), 0
        else:
            scale, zero = np.float32(1.0 / 256), qt.qmin
    else:
        scale, zero = affine.activation_qparams(min(lo, 0.0), max(hi, 1.0), qt, symmetric=symmetric,
                                                power_of_two=power_of_two)
    return ActivationParams(qt.name, float(scale), int(zero),
                            affine.representable_range(np.float32(scale), int(zero), qt), SOFTMAX_SOURCE)


def build_plan(index: GraphIndex, selection: Selection, groups: tuple[TiedGroup, ...],
               ranges: Mapping[str, tuple[float, float]], config: QuantConfig, *,
               choices: Mapping[int, GroupChoice] | None = None,
               float_layers: frozenset[str] = frozenset(), wide_layers: frozenset[str] = frozenset(),
               narrow_layers: frozenset[str] = frozenset(),
               bias_corrections: Mapping[str, np.ndarray] | None = None) -> QuantPlan:
    """Decide every parameter; see the module docstring.

    ``choices`` replace groups' calibrated ranges or types; ``float_layers`` keep their weights float;
    ``wide_layers`` (raised to 16 bits) get int16 weights; ``narrow_layers`` (lowered to 4 bits) get
    int4 weights at the clipping scale of least squared error; ``bias_corrections`` (node: one value
    per output channel) are added to the biases of layers whose weights stay 8-bit.
    With ``config.optimizing`` weight scales come from a per-channel clipping search.
    """
    choices = choices or {}
    group_plans = tuple(
        GroupPlan(g.id, g.members, tuple(dict.fromkeys(t.node for t in g.ties)),
                  group_params(g, ranges, index, config, choices.get(g.id)))
        for g in groups
    )
    plan_groups = {m: gp for gp in group_plans for m in gp.members}
    weights = _weight_plans(index, selection, plan_groups, config, float_layers=float_layers, wide_layers=wide_layers,
                            narrow_layers=narrow_layers, corrections=bias_corrections or {})
    layers = []
    nodes = {n.name: n for n in index.nodes}
    for name in selection.layers:
        node = nodes[name]
        rule = RULES[node.op_type]
        inputs = tuple(t for _, t in data_inputs(node, rule) if t in plan_groups)
        outputs = tuple(o for o in node.output if o in plan_groups)
        widths = {precision_name(plan_groups[t].params.qtype) for t in inputs + outputs} or {"int8"}
        if name in float_layers:
            widths.add(FLOAT)
        elif name in wide_layers:
            widths.add("int16")
        precision = next(p for p in (FLOAT, "int16", "int8", "int4") if p in widths)
        if name in narrow_layers and precision != FLOAT:
            precision = "int4"  # int4 weights and input: the kernel is W4A4 whatever its output's width
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
    if config.overflow_fix in ("disable", "pairs"):
        return False
    group = groups.get(node.input[0])
    return group is not None and any(_from_model_input(m, index) for m in group.members)


def _reduction_rows(node: onnx.NodeProto, w: np.ndarray) -> np.ndarray | None:
    """The weights as (output channels, K) in the order onnxruntime's x86 kernels reduce over; None if exact.

    Conv: K runs over (kernel offset, input channel), channels fastest; a depthwise layer (one input
    and one output channel per group) has its own exact kernel. MatMul and Gemm: K of B. Measured
    with single QLinearConv nodes: a pair straddles two kernel offsets when the channels per group
    are odd, and a layer with one input channel and several outputs pairs neighbouring offsets.
    """
    if node.op_type == "Conv" and w.ndim >= 3:
        group = int(attribute(node, "group", 1))
        if w.shape[1] == 1 and w.shape[0] == group:
            return None
        return np.moveaxis(w, 1, -1).reshape(w.shape[0], -1)
    if node.op_type == "MatMul" and w.ndim == 2:
        return w.T
    if node.op_type == "Gemm" and w.ndim == 2:
        return w if attribute(node, "transB", 0) else w.T
    return None


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
    """Whether the layer's activation inputs are 8-bit, as onnxruntime's integer kernels need.

    Only a layer with 8-bit inputs and 8-bit weights gets a bias at ``s_in * s_w``; any wider operand
    makes that scale so small that the bias overflows int32.
    """
    operands = [groups.get(t) for t in node.input[:2] if t in groups] or [None]
    return all(g is not None and precision_name(g.params.qtype) == "int8" for g in operands)


@dataclass(frozen=True)
class _Weights:
    """What weight planning needs besides the slot: the graph, the groups, the config, the raised layers."""

    index: GraphIndex
    nodes: Mapping[str, onnx.NodeProto]
    groups: Mapping[str, GroupPlan]
    config: QuantConfig
    wide_layers: frozenset[str]
    narrow_layers: frozenset[str]
    corrections: Mapping[str, np.ndarray]

    def integer_kernel(self, node: onnx.NodeProto) -> bool:
        """Whether the layer runs on an integer kernel: 8-bit inputs and 8-bit weights."""
        return (_integer_kernel_input(node, self.groups) and node.name not in self.wide_layers
                and node.name not in self.narrow_layers)

    def constant(self, tensor: str) -> np.ndarray:
        """A weight or bias value as float32 (:func:`qnnlib.prepare.check_weights` has refused NaN and inf)."""
        return self.index.constant(tensor).astype(np.float32)


def _weight_plans(index: GraphIndex, selection: Selection, groups: Mapping[str, GroupPlan], config: QuantConfig, *,
                  float_layers: frozenset[str], wide_layers: frozenset[str], narrow_layers: frozenset[str],
                  corrections: Mapping[str, np.ndarray]) -> tuple[WeightPlan, ...]:
    ctx = _Weights(index, {n.name: n for n in index.nodes}, groups, config, wide_layers, narrow_layers, corrections)
    biases = {s.node: s for s in selection.weights if s.kind == BIAS}
    weights = [_weight_plan(ctx, slot, biases.get(slot.node)) for slot in selection.weights
               if slot.kind == WEIGHT and slot.node not in float_layers]
    scales = {w.node: np.asarray(w.scales, np.float32) for w in weights}
    bias_plans = [_bias_plan(ctx, slot, scales.get(slot.node)) for slot in selection.weights
                  if slot.kind == BIAS and slot.node not in float_layers and ctx.nodes[slot.node].input[0] in groups]
    return tuple(weights + bias_plans)


def _weight_plan(ctx: _Weights, slot: WeightSlot, bias: WeightSlot | None) -> WeightPlan:
    """Symmetric per-channel weight scales: int8, int16 when raised, int4 when lowered.

    Clipped by MSE when optimising, and always at 4 bits (``qmax = 7``: clipping decides there).
    """
    node = ctx.nodes[slot.node]
    w = ctx.constant(slot.tensor)
    narrow = slot.node in ctx.narrow_layers
    wqt = qtype(WIDE_WEIGHT if slot.node in ctx.wide_layers else NARROW_WEIGHT if narrow else ctx.config.weight_type)
    qmax = wqt.qmax
    if wqt.qmax == 127 and _overflow_fix_applies(node, ctx.index, ctx.groups, ctx.config):
        qmax = affine.OVERFLOW_SAFE_QMAX
    search = ctx.config.optimizing or narrow
    scales = (affine.mse_weight_scales if search else affine.weight_scales)(w, slot.axis, qmax)
    minimum = None
    if ctx.config.overflow_fix == "pairs" and wqt.qmax == 127 and ctx.integer_kernel(node):
        rows = _reduction_rows(node, w)
        if rows is not None:
            minimum = affine.pair_safe_scales(rows, scales, qmax)
            scales = minimum
    if bias is not None and slot.axis is not None and ctx.integer_kernel(node):
        s_in = np.float32(ctx.groups[node.input[0]].params.scale)
        safe = affine.bias_safe_scales(scales, w, slot.axis, ctx.index.constant(bias.tensor), s_in)
        raised = np.where(safe > scales, safe, 0.0).astype(np.float32)
        minimum = raised if minimum is None else np.maximum(minimum, raised)
        scales = safe
    if ctx.config.power_of_two_scales:
        scales = affine.power_of_two_weight_scales(w, slot.axis, qmax, scales, minimum=minimum)
    return WeightPlan(slot.node, slot.input_index, slot.tensor, WEIGHT, wqt.name, slot.axis,
                      tuple(float(s) for s in scales), qmax=qmax)


def _bias_plan(ctx: _Weights, slot: WeightSlot, weight_scales: np.ndarray | None) -> WeightPlan:
    """An int32 bias: at ``s_in * s_w`` for integer kernels, else at a scale of its own."""
    node = ctx.nodes[slot.node]
    b = ctx.constant(slot.tensor).reshape(-1)
    keeps_8_bits = slot.node not in ctx.wide_layers and slot.node not in ctx.narrow_layers
    correction = ctx.corrections.get(slot.node) if keeps_8_bits else None
    if correction is not None:
        b = b + np.asarray(correction, np.float32).reshape(-1)
    if ctx.integer_kernel(node):
        s_in = np.float32(ctx.groups[node.input[0]].params.scale)
        if weight_scales is None:  # Gemm whose B is an activation: its group's scale
            weight_scales = np.array([ctx.groups[node.input[1]].params.scale], np.float32)
        scales = affine.bias_scales(s_in, weight_scales)
    else:
        # The layer runs in float. onnxruntime would quantise a float bias between Q/DQ nodes itself,
        # at s_in * s_w, which overflows int32 for 16-bit operands: give it an int32 bias of its own.
        scales = affine.standalone_bias_scales(b)
    if scales.size == 1 and b.size > 1:
        scales = np.full(b.shape, scales[0], np.float32)
    _, clamped = affine.quantize_bias(b, scales)
    if clamped:
        log.warning("bias %r of node %r: %d values overflow int32 and are clamped", slot.tensor, slot.node, clamped)
    return WeightPlan(slot.node, slot.input_index, slot.tensor, BIAS, "int32", 0, tuple(float(s) for s in scales),
                      clamped, correction=() if correction is None else tuple(float(c) for c in correction.reshape(-1)))
