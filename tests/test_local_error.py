"""The probe's local errors are what quantising one group does at its readers, and the perturbation
model fed the probe's differences reproduces the one-group configuration exactly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import qnnlib
from qnnlib.config import QuantConfig
from qnnlib.emit.simulation import build_simulation
from qnnlib.graph.edit import with_outputs
from qnnlib.graph.index import GraphIndex
from qnnlib.graph.model_io import load_model, make_session
from qnnlib.graph.normalize import normalize
from qnnlib.local_error import build_perturbation, build_probe, readers
from qnnlib.numerics import affine
from qnnlib.numerics.qtypes import qtype
from qnnlib.optimize.error import region_outputs
from qnnlib.plan import QuantPlan
from qnnlib.precision import owned_weights
from tests import builders

Setting = tuple[onnx.ModelProto, QuantPlan, list[dict[str, np.ndarray]]]


@pytest.fixture(scope="module")
def setting() -> Setting:
    """The normalised float model, a plan without bias correction (the probe keeps float biases), calibration."""
    model = builders.conv_net()
    calib = builders.calibration(model, 4)
    result = qnnlib.quantize(model, calib, config=QuantConfig(optimize=False))
    return normalize(load_model(model)).model, result.plan, calib


def test_local_error_of_the_input_group_is_its_first_convolutions_error(setting: Setting) -> None:
    model, plan, calib = setting
    group = plan.group_of("input")
    assert group is not None
    probe = build_probe(model, plan, params={"int8": {group.id: group.params}}, weights={}, owned={})
    names = probe.outputs
    session = make_session(probe.model)
    local = probe.local_errors([dict(zip(names, session.run(names, f), strict=True)) for f in calib])
    # the same by numpy: the first convolution's output on quantised and on float inputs
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    probe_conv = make_session(with_outputs(model, [conv.output[0]]))
    qt = qtype(group.params.qtype)
    noise = signal = 0.0
    for f in calib:
        x = f["input"]
        xq = affine.fake_quantize(x, group.params.scale, group.params.zero_point, qt)
        want = probe_conv.run([conv.output[0]], {"input": x})[0]
        got = probe_conv.run([conv.output[0]], {"input": xq})[0]
        noise += float(((got - want) ** 2).sum())
        signal += float((want**2).sum())
    assert local[(group.id, "int8")] == pytest.approx(noise / signal, rel=1e-4)


def test_readers_skip_nodes_inside_the_group(setting: Setting) -> None:
    model, plan, _ = setting
    index = GraphIndex(model)
    for group in plan.groups:
        for node in readers(index, group.members):
            assert not set(node.output) & set(group.members)


def test_perturbation_reproduces_the_one_group_configuration(setting: Setting) -> None:
    model, plan, calib = setting
    owned = owned_weights(plan)
    gid = next(g for g in owned)  # a group owning weights: activations and weights both change
    group = plan.groups[gid]
    weights = {}
    for wp in owned[gid]:
        value = GraphIndex(model).constant(wp.tensor)
        weights[(wp.node, wp.input_index)] = affine.dequantize(
            affine.quantize_weight(value, np.asarray(wp.scales, np.float32), wp.axis, qtype(wp.qtype), wp.qmax),
            np.asarray(wp.scales, np.float32), 0, wp.axis)
    points = region_outputs(model, plan)
    probe = build_probe(model, plan, params={"int8": {gid: group.params}}, weights={"int8": weights}, owned=owned,
                        points=points, differences_at=("int8",))
    pairs = probe.diffs[(gid, "int8")]
    session = make_session(probe.model)
    perturbation = build_perturbation(model, probe.perturbed)
    perturbed = make_session(perturbation.model)
    sim = build_simulation(model, plan, weight_switches=True)
    sim_session = make_session(sim.model, optimization="basic")
    switches = {**sim.feeds({g.id: g.params for g in plan.groups}, {gid}),
                **sim.weight_feeds({(wp.node, wp.input_index): (np.asarray(wp.scales, np.float32), wp.qmax)
                                    for wp in owned[gid]})}
    outputs = [o.name for o in model.graph.output]
    for f in calib:
        diffs = session.run([d for d, _ in pairs], f)
        deltas = {perturbation.inputs[t]: d for (_, t), d in zip(pairs, diffs, strict=True)}
        got = perturbed.run(outputs, {**f, **deltas})
        want = sim_session.run(outputs, {**f, **switches})
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(np.abs(w).max()))
