"""A plan with a precision per tied group: ``int4``, ``int8``, ``int16`` or ``float``.

A group's precision covers its activations and its owned weights, as in the sensitivity analysis
(:mod:`qnnlib.precision`): a weighted layer's weights follow the group of its data input. So

* ``int4``: activations in the 4-bit type (``uint4`` for ``uint8``) over the group's 16-level
  least-squared-error range; owned weights int4 per channel (``qmax = 7``, clipping scale of least
  squared error);
* ``int8``: the base plan's parameters and weights;
* ``int16``: activations in the 16-bit type over :data:`qnnlib.precision.RAISED_MARGIN` times the
  observed extent; owned weights int16;
* ``float``: no Q/DQ on the group; owned weights float.

Only layers reading two 8-bit operands with 8-bit weights run on onnxruntime's integer kernels; the
others run in float between their Q/DQ nodes (int4 saves size, not time, on a CPU).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from qnnlib.calibration.collect import CalibrationStats
from qnnlib.config import QuantConfig
from qnnlib.numerics.qtypes import FLOAT
from qnnlib.plan import QuantPlan
from qnnlib.planner import GroupChoice, build_plan
from qnnlib.precision import activation_type_at, owned_weights, range_at
from qnnlib.prepare import PreparedModel

#: Every precision a group can take.
PRECISIONS = ("int4", "int8", "int16", "float")


def plan_with_precisions(m: PreparedModel, base: QuantPlan, stats: CalibrationStats, config: QuantConfig,
                         precisions: Mapping[int, str], *,
                         corrections: Mapping[str, np.ndarray] | None = None) -> QuantPlan:
    """``base`` (the int8 plan) with each group in ``precisions`` at its precision (see the module docstring).

    Groups not in ``precisions`` keep ``base``'s parameters; a group ``base`` leaves float stays float;
    an override keeps its parameters at any precision other than ``float``.
    """
    owned = owned_weights(base)
    choices: dict[int, GroupChoice] = {}
    layers: dict[str, set[str]] = {p: set() for p in PRECISIONS}
    for g in base.groups:
        precision = precisions.get(g.id, "int8")
        if g.params.qtype == FLOAT or precision == "int8":
            choices[g.id] = GroupChoice(range=g.params.range, qtype=g.params.qtype, source=g.params.source)
            continue
        layers[precision].update(wp.node for wp in owned.get(g.id, ()))
        if precision == FLOAT:
            choices[g.id] = GroupChoice(qtype=FLOAT, source="mixed precision")
        else:
            span = range_at(g.members, precision, extremes=stats.extremes, low_bit_ranges=stats.low_bit_ranges)
            choices[g.id] = GroupChoice(range=span or g.params.range,
                                        qtype=activation_type_at(config.activation_type, precision),
                                        source="mixed precision")
    return build_plan(m.index, m.selection, m.groups, stats.ranges, config, choices=choices,
                      float_layers=frozenset(layers[FLOAT]), wide_layers=frozenset(layers["int16"]),
                      narrow_layers=frozenset(layers["int4"]), bias_corrections=corrections)
