"""What a tied group's precision means for its activations and for the weights that go with it.

A group at precision ``p`` (``int4``, ``int8`` or ``int16``) has

* its activations in the ``p``-bit form of the configured activation type (``uint8`` gives
  ``uint4``, ``uint8``, ``uint16``; ``int8`` gives ``int4``, ``int8``, ``int16``), over the range
  ``int4``: the least-squared-error range of the calibration histogram at 16 levels (clipping
  decides at 4 bits; min-max when the calibration method keeps no histogram);
  ``int8``: the plan's range; ``int16``: the observed extent times :data:`RAISED_MARGIN`;
* the weights of the layers that read it (its *owned* weights: a weighted layer's weights belong to
  the group of its data input, or of its output when its input is not quantised), symmetric per
  channel, ``q = clip(rint(w / s[c]), -qmax, qmax)`` with ``qmax = 2**(bits-1) - 1``: at 4 bits
  ``s[c]`` is the clipping scale of least squared error, at 8 bits the plan's (overflow fix
  included), at 16 bits ``max|w[c]| / qmax``.

So a layer's kernel precision is that of the group it reads: ``W4A4``, ``W8A8``, ``W16A16``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from qnnlib.numerics import affine
from qnnlib.numerics.qtypes import FLOAT, INT8, INT16, qtype
from qnnlib.plan import ActivationParams, GroupPlan, QuantPlan, WeightPlan

#: Precisions a group can be lowered or raised to, and their bit widths.
BITS = {"int4": 4, "int8": 8, "int16": 16}
#: A group raised to 16 bits covers this multiple of its observed extent: inputs beyond what
#: calibration saw would otherwise clip, and clipping, not rounding, then limits the error; one
#: bit of the sixteen pays for the doubled range.
RAISED_MARGIN = 2.0

_ACTIVATION_TYPES = {("uint8", 4): "uint4", ("uint8", 8): "uint8", ("uint8", 16): "uint16",
                     ("int8", 4): "int4", ("int8", 8): "int8", ("int8", 16): "int16"}


def activation_type_at(activation_type: str, precision: str) -> str:
    """The storage type of activations at ``precision`` for the configured 8-bit ``activation_type``."""
    return _ACTIVATION_TYPES[(activation_type, BITS[precision])]


def weight_qmax(precision: str) -> int:
    """``2**(bits - 1) - 1``: the largest weight magnitude at ``precision`` (symmetric)."""
    return 2 ** (BITS[precision] - 1) - 1


def extent(members: tuple[str, ...], extremes: Mapping[str, tuple[float, float]]) -> tuple[float, float] | None:
    """The union of the observed ``(min, max)`` of the members that were observed."""
    seen = [extremes[m] for m in members if m in extremes]
    return (min(s[0] for s in seen), max(s[1] for s in seen)) if seen else None


def widened(span: tuple[float, float] | None) -> tuple[float, float] | None:
    """``span`` scaled by :data:`RAISED_MARGIN` about zero (a bound at zero stays there)."""
    return None if span is None else (span[0] * RAISED_MARGIN, span[1] * RAISED_MARGIN)


def range_at(members: tuple[str, ...], precision: str, *, extremes: Mapping[str, tuple[float, float]],
             low_bit_ranges: Mapping[str, tuple[float, float]]) -> tuple[float, float] | None:
    """A group's range at 16 or 4 bits (see the module docstring); None when no member was observed.

    ``int16``: the observed extent widened by :data:`RAISED_MARGIN`; ``int4``: the union of the
    members' 16-level least-squared-error ranges.
    """
    if precision == "int16":
        return widened(extent(members, extremes))
    seen = [low_bit_ranges[m] for m in members if m in low_bit_ranges]
    return (min(s[0] for s in seen), max(s[1] for s in seen)) if seen else None


def group_params(group: GroupPlan, precision: str, *, activation_type: str, symmetric: bool,
                 power_of_two: bool = False, extremes: Mapping[str, tuple[float, float]],
                 low_bit_ranges: Mapping[str, tuple[float, float]],
                 source: str | None = None) -> ActivationParams | None:
    """The group's parameters at ``precision`` (see the module docstring); None when it stays float.

    ``source`` names how the new parameters were chosen (default ``"<precision> analysis"``).
    """
    if group.params.qtype == FLOAT:
        return None
    if precision == "int8" or group.params.source == "override":
        return group.params
    span = range_at(group.members, precision, extremes=extremes, low_bit_ranges=low_bit_ranges)
    if span is None:
        return None
    qt = qtype(activation_type_at(activation_type, precision))
    scale, zero = affine.activation_qparams(span[0], span[1], qt, symmetric=symmetric, power_of_two=power_of_two)
    return ActivationParams(qt.name, float(scale), int(zero), span, source or f"{precision} analysis")


def weight_scales_at(wp: WeightPlan, value: np.ndarray, precision: str, *,
                     power_of_two: bool = False) -> tuple[np.ndarray, int]:
    """Per-channel scales and ``qmax`` of a planned weight at ``precision`` (see the module docstring).

    ``power_of_two``: each scale then rounded to a power of two as the planner does.
    """
    if precision == "int8":
        return np.asarray(wp.scales, np.float32), wp.qmax
    qmax = weight_qmax(precision)
    axis = wp.axis if len(wp.scales) > 1 else None
    scales = (affine.weight_scales if precision == "int16" else affine.mse_weight_scales)(value, axis, qmax)
    if power_of_two:
        scales = affine.power_of_two_weight_scales(value, axis, qmax, scales)
    return scales, qmax


def owned_weights(plan: QuantPlan) -> dict[int, tuple[WeightPlan, ...]]:
    """Each group's owned weights (see the module docstring); biases are not weights here."""
    owner: dict[str, int] = {}
    for layer in plan.layers:
        tensors = layer.inputs or layer.outputs
        group = plan.group_of(tensors[0]) if tensors else None
        if group is not None:
            owner[layer.node] = group.id
    owned: dict[int, list[WeightPlan]] = {}
    for wp in plan.weights:
        if wp.kind == "weight" and wp.node in owner:
            owned.setdefault(owner[wp.node], []).append(wp)
    return {gid: tuple(ws) for gid, ws in owned.items()}


def fake_quantize_weight(value: np.ndarray, scales: np.ndarray, axis: int | None, qmax: int) -> np.ndarray:
    """``clip(rint(w / s[c]), -qmax, qmax) * s[c]`` along ``axis``: :func:`affine.quantize_weight`, dequantised."""
    scales = np.asarray(scales, np.float32).reshape(-1)
    axis = axis if scales.size > 1 else None
    q = affine.quantize_weight(np.asarray(value, np.float32), scales, axis, INT16 if qmax > INT8.qmax else INT8, qmax)
    return affine.dequantize(q, scales if axis is not None else scales.reshape(()), 0, axis)
