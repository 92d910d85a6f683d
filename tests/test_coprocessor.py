"""The coprocessor stand-in: ort-exact equals onnxruntime at every integer tensor; q31 and pot run close."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qnnlib
from qnnlib.coprocessor import InferenceSession
from qnnlib.coprocessor.kernels import pair_saturation
from qnnlib.coprocessor.session import COPROCESSOR, CPU
from qnnlib.errors import ConfigError, InputError
from qnnlib.graph.edit import with_outputs
from tests import builders
from tests.conftest import session as ort_session
from tests.conftest import sqnr_db


@pytest.fixture(scope="module", params=["conv_net", "mlp", "transformer_block"])
def case(request: pytest.FixtureRequest) -> tuple[onnx.ModelProto, qnnlib.QuantResult, list[dict[str, np.ndarray]]]:
    """A float model, its quantisation and three held-out feeds."""
    model = getattr(builders, request.param)()
    return model, qnnlib.quantize(model, builders.calibration(model, 16)), builders.calibration(model, 3, seed=5)


@pytest.fixture
def quantised(case) -> tuple[qnnlib.QuantResult, list[dict[str, np.ndarray]]]:  # type: ignore[no-untyped-def]
    """The quantisation and the feeds of :func:`case`."""
    return case[1], case[2]


def test_ort_exact_equals_onnxruntime_at_every_claimed_tensor(quantised) -> None:
    result, feeds = quantised
    integer = result.integer_model()
    session = InferenceSession(integer, policy="ort-exact")
    placement = session.placement()
    claimed = [n.output[0] for n in integer.graph.node if placement[n.name or n.output[0]] == COPROCESSOR]
    assert claimed, "nothing was claimed"
    outputs = [o.name for o in session.get_outputs()]
    reference = ort_session(with_outputs(integer, claimed))
    for feed in feeds:
        want = reference.run(outputs + claimed, feed)
        got = session.run(outputs + claimed, feed)
        for name, w, g in zip(outputs + claimed, want, got, strict=True):
            assert w.dtype == g.dtype and w.shape == g.shape, name
            assert np.count_nonzero(w != g) == 0, f"{name}: {np.count_nonzero(w != g)} of {w.size} differ"


def test_the_qdq_model_is_accepted_and_its_interface_is_onnxruntimes(quantised) -> None:
    result, feeds = quantised
    ours = InferenceSession(result.model)
    theirs = result.session()
    assert [i.name for i in ours.get_inputs()] == [i.name for i in theirs.get_inputs()]
    assert [o.name for o in ours.get_outputs()] == [o.name for o in theirs.get_outputs()]
    assert ours.get_inputs()[0].type == theirs.get_inputs()[0].type
    for want, got in zip(theirs.run(None, feeds[0]), ours.run(None, feeds[0]), strict=True):
        np.testing.assert_array_equal(want, got)
    assert set(ours.placement().values()) <= {COPROCESSOR, CPU}


def test_q31_is_as_accurate_as_ort_exact_and_pot_runs(case) -> None:
    """Against float: q31 (exact integer arithmetic) is never worse than onnxruntime's numerics.

    onnxruntime loses product pairs saturated in int16 on AVX2 CPUs. pot (scales rounded to powers
    of two; qnnlib's scales are not constrained to them here) runs and stays correlated.
    """
    model, result, feeds = case
    want = np.concatenate([ort_session(model).run(None, f)[0].ravel() for f in feeds])
    scores = {}
    for policy in ("ort-exact", "q31", "pot"):
        session = InferenceSession(result.model, policy=policy)
        scores[policy] = sqnr_db(want, np.concatenate([session.run(None, f)[0].ravel() for f in feeds]))
    assert scores["q31"] >= scores["ort-exact"] - 0.5
    assert scores["pot"] > 5.0


def test_pair_saturation_is_what_int16_addition_loses() -> None:
    a = np.array([[255, 255, 1, 2]], np.uint8)
    b = np.array([[127, 127, 5, 5], [10, 10, 10, 10]], np.int8)
    # pair (255*127 + 255*127) = 64770 saturates to 32767; every other pair fits
    np.testing.assert_array_equal(pair_saturation(a, b), [[32767 - 64770, 0]])


def _saturating_conv() -> onnx.ModelProto:
    """One QLinearConv whose uint8 x int8 pairs reach 2 * 255 * 127: saturated by AVX2 without VNNI."""
    rng = np.random.default_rng(0)
    w = rng.choice(np.array([-127, 127], np.int8), size=(4, 8, 3, 3)).astype(np.int8)
    inits = [numpy_helper.from_array(v, n) for n, v in [
        ("xs", np.array(0.02, np.float32)), ("xz", np.array(0, np.uint8)), ("w", w),
        ("ws", np.full(4, 0.01, np.float32)), ("wz", np.zeros(4, np.int8)), ("ys", np.array(5.0, np.float32)),
        ("yz", np.array(128, np.uint8))]]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 8, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_saturating_convolution_matches_this_cpus_onnxruntime() -> None:
    model = _saturating_conv()
    x = np.random.default_rng(1).integers(200, 256, size=(1, 8, 6, 6)).astype(np.uint8)
    want = ort_session(model).run(None, {"x": x})[0]
    got = InferenceSession(model).run(None, {"x": x})[0]
    np.testing.assert_array_equal(want, got)
    assert InferenceSession(model).placement() == {"y": COPROCESSOR}


def test_bad_policy_and_bad_feeds_are_typed_errors(quantised) -> None:
    result, feeds = quantised
    with pytest.raises(ConfigError, match="policy"):
        InferenceSession(result.model, policy="fast")
    session = InferenceSession(result.model)
    with pytest.raises(InputError, match="missing inputs"):
        session.run(None, {})
    with pytest.raises(InputError, match="unknown outputs"):
        session.run(["nope"], feeds[0])
