"""The simulation models: quantisation points whose parameters are inputs, or fixed and switchable."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

import qnnlib
from qnnlib.emit.simulation import build_simulation, build_switched
from qnnlib.graph.index import GraphIndex
from qnnlib.graph.model_io import load_model, make_session
from qnnlib.graph.normalize import normalize
from qnnlib.numerics import affine
from qnnlib.numerics.qtypes import INT8
from tests import builders


def _setup(*, optimize: bool = False) -> tuple[onnx.ModelProto, qnnlib.QuantResult, list[dict[str, np.ndarray]]]:
    model = builders.conv_net()
    calib = builders.calibration(model, 8)
    result = qnnlib.quantize(model, calib, config=qnnlib.QuantConfig(optimize=optimize))
    return normalize(load_model(model)).model, result, calib


def test_everything_off_is_the_float_model() -> None:
    normalized, result, calib = _setup()
    sim = build_simulation(normalized, result.plan, weight_switches=True)
    assert sim.weight_inputs  # one quantisation point per planned weight
    session = make_session(sim.model, optimization="basic")
    float_session = make_session(normalized)
    params = {g.id: g.params for g in result.plan.groups}
    feeds = {**sim.feeds(params, set()), **sim.weight_feeds({})}
    for f in calib[:2]:
        np.testing.assert_allclose(session.run(None, {**f, **feeds})[0], float_session.run(None, f)[0],
                                   rtol=1e-5, atol=1e-6)


def test_one_weight_at_four_bits_is_that_weight_fake_quantised() -> None:
    normalized, result, calib = _setup()
    sim = build_simulation(normalized, result.plan, weight_switches=True)
    wp = next(w for w in result.plan.weights if w.kind == "weight" and len(w.scales) > 1)
    weight = GraphIndex(normalized).constant(wp.tensor).astype(np.float32)
    scales = affine.mse_weight_scales(weight, wp.axis, 7)
    # the same weight quantised to [-7, 7] in numpy, written into a copy of the float model
    shape = [1] * weight.ndim
    shape[wp.axis % weight.ndim] = -1  # type: ignore[operator]
    expected_weight = affine.dequantize(affine.quantize_weight(weight, scales, wp.axis, INT8, 7),
                                        scales.reshape(shape), 0)
    assert not np.array_equal(expected_weight, weight)
    edited = onnx.ModelProto()
    edited.CopyFrom(normalized)
    for init in edited.graph.initializer:
        if init.name == wp.tensor:
            init.CopyFrom(numpy_helper.from_array(expected_weight, wp.tensor))
    params = {g.id: g.params for g in result.plan.groups}
    feeds = {**sim.feeds(params, set()), **sim.weight_feeds({(wp.node, wp.input_index): (scales, 7)})}
    session = make_session(sim.model, optimization="basic")
    reference = make_session(edited)
    for f in calib[:2]:
        got = session.run(None, {**f, **feeds})[0]
        np.testing.assert_allclose(got, reference.run(None, f)[0], rtol=1e-5, atol=1e-5)
        assert not np.allclose(got, make_session(normalized).run(None, f)[0], rtol=1e-5, atol=1e-5)


def test_the_switched_plan_matches_the_simulation_on_every_switch() -> None:
    normalized, result, calib = _setup()
    plan = result.plan
    switched = build_switched(normalized, plan)
    assert set(switched.groups) == {g.id for g in plan.groups if g.params.qtype != "float"}
    assert set(switched.weights) == {(w.node, w.input_index) for w in plan.weights if w.kind == "weight"}
    sim = build_simulation(normalized, plan)  # the plan's weights and biases as constants
    session, sim_session = make_session(switched.model), make_session(sim.model, optimization="basic")
    params = {g.id: g.params for g in plan.groups}
    some = sorted(switched.groups)[1]
    for f in calib[:2]:
        # everything quantised as planned; then one group in float
        np.testing.assert_allclose(session.run(None, {**f, **switched.feeds()})[0],
                                   sim_session.run(None, {**f, **sim.feeds(params, set(params))})[0],
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(session.run(None, {**f, **switched.feeds(off_groups={some})})[0],
                                   sim_session.run(None, {**f, **sim.feeds(params, set(params) - {some})})[0],
                                   rtol=1e-5, atol=1e-5)


def test_the_switched_plan_all_off_is_the_float_model() -> None:
    normalized, result, calib = _setup(optimize=True)
    assert any(w.kind == "bias" and w.correction for w in result.plan.weights)  # corrected biases switch off too
    switched = build_switched(normalized, result.plan)
    session, float_session = make_session(switched.model), make_session(normalized)
    off = switched.feeds(off_groups=set(switched.groups), off_weights=set(switched.weights))
    for f in calib[:2]:
        got, want = session.run(None, {**f, **off})[0], float_session.run(None, f)[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(session.run(None, {**f, **switched.feeds()})[0], want, rtol=1e-4, atol=1e-4)
