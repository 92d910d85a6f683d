"""Bias correction: take out the mean output shift that a layer's quantised weights cause.

For a layer ``y = op(x, W) + b`` (Conv, ConvTranspose, Gemm) whose weights are quantised to
``W_q``, on its inputs ``x`` as the simulation model computes them (every group quantised as
planned), the shift per output channel ``c`` is

    delta_c = mean over samples and positions of [op(x, W) - op(x, W_q)]_c = mean [op(x, W - W_q)]_c

(``op`` is linear in its weights), and the bias becomes ``b + delta``: the layer's quantised output
then has the mean its float weights would give on the same inputs. Rounding weights to nearest is
unbiased per weight, but a channel's sum over many products with non-negative inputs (after a
Relu) is not, least of all for depthwise convolutions with nine weights per channel, and clipped
weights (MSE clipping) shift it further. Each layer's correction depends only on its own weights
and inputs, so all are measured in one pass. A layer with fewer than ``MIN_POSITIONS`` output
values per channel over the samples (a classifier's Gemm) is left alone: its mean is noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qnnlib.emit.simulation import build_simulation, dequantised_weight
from qnnlib.graph.edit import with_outputs
from qnnlib.graph.index import GraphIndex
from qnnlib.graph.model_io import make_session
from qnnlib.graph.names import NameAllocator
from qnnlib.numerics.qtypes import precision_name
from qnnlib.plan import ActivationParams, QuantPlan

Feed = dict[str, np.ndarray]

#: Layers whose output channels lie on axis 1 and whose output is linear in the weight input.
CORRECTED_OPS = ("Conv", "ConvTranspose", "Gemm")
#: Output values per channel (samples times positions) below which the mean is too noisy to apply:
#: a Gemm on a batch of one sees one value per sample.
MIN_POSITIONS = 64


def bias_corrections(float_model: onnx.ModelProto, plan: QuantPlan, feeds: Sequence[Feed]) -> dict[str, np.ndarray]:
    """``delta`` (float32, one value per output channel) for every layer with a bias and 8-bit weights."""
    index = GraphIndex(float_model)
    nodes = {n.name: n for n in index.nodes}
    biased = {w.node for w in plan.weights if w.kind == "bias"}
    targets = [w for w in plan.weights
               if w.kind == "weight" and w.node in biased and w.input_index == 1 and precision_name(w.qtype) == "int8"
               and nodes[w.node].op_type in CORRECTED_OPS]
    if not targets or not feeds:
        return {}
    sim = build_simulation(float_model, plan)
    names = NameAllocator(sim.model)
    sim_nodes = {n.name: n for n in sim.model.graph.node}
    outputs: dict[str, str] = {}
    betas: dict[str, float] = {}
    for wp in targets:
        weight = index.constant(wp.tensor).astype(np.float32)
        delta_name = names.fresh(f"{wp.node}_weight_error")
        sim.model.graph.initializer.append(numpy_helper.from_array(weight - dequantised_weight(weight, wp), delta_name))
        node = sim_nodes[wp.node]
        outputs[wp.node] = names.fresh(f"{wp.node}_bias_shift")
        shift = helper.make_node(node.op_type, [node.input[0], delta_name], [outputs[wp.node]],
                                 name=names.fresh(f"{wp.node}_bias_shift_node"), domain=node.domain)
        shift.attribute.extend(node.attribute)
        sim.model.graph.node.append(shift)
        beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0) if node.op_type == "Gemm" else 1.0
        if beta != 1.0:  # Gemm adds beta * C: the correction of C is the shift over beta
            betas[wp.node] = beta
    session = make_session(with_outputs(sim.model, list(outputs.values())), optimization="basic",
                           log_errors_as="bias correction model")
    params: dict[int, ActivationParams] = {g.id: g.params for g in plan.groups}
    switches = sim.feeds(params, set(params))
    wanted = list(outputs.values())
    totals = dict.fromkeys(outputs, np.zeros(0))
    positions = dict.fromkeys(outputs, 0)
    for feed in feeds:
        for layer, value in zip(outputs, session.run(wanted, {**feed, **switches}), strict=True):
            per_channel = np.moveaxis(np.asarray(value, np.float64), 1, 0).reshape(value.shape[1], -1)
            totals[layer] = per_channel.sum(axis=1) + (totals[layer] if totals[layer].size else 0.0)
            positions[layer] += per_channel.shape[1]
    return {layer: (total / (positions[layer] * betas.get(layer, 1.0))).astype(np.float32)
            for layer, total in totals.items() if positions[layer] >= MIN_POSITIONS}
