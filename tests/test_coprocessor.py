"""The coprocessor stand-in: ort-exact equals onnxruntime at every integer tensor; q31 and pot run close."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qnnlib
from qnnlib.coprocessor import InferenceSession
from qnnlib.coprocessor.kernels import INT16_MAX, INT16_MIN, ExactProduct, PairSaturation, pair_axes
from qnnlib.coprocessor.session import COPROCESSOR, CPU
from qnnlib.errors import ConfigError, InputError, UnsupportedModelError
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
    claimed = session.coprocessor_outputs()
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

    onnxruntime loses product pairs saturated in int16 on AVX2 CPUs. pot runs (its factors rounded to
    powers of two; qnnlib's scales are not constrained to them here, so it is far from float).
    """
    model, result, feeds = case
    want = np.concatenate([ort_session(model).run(None, f)[0].ravel() for f in feeds])
    scores = {}
    for policy in ("ort-exact", "q31", "pot"):
        session = InferenceSession(result.model, policy=policy)
        scores[policy] = sqnr_db(want, np.concatenate([session.run(None, f)[0].ravel() for f in feeds]))
    assert scores["q31"] >= scores["ort-exact"] - 0.5
    assert np.isfinite(scores["pot"])


def _saturation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(rows of ``a``, rows of ``b``) of ``sum_j sat16(pair_j) - pair_j`` through :class:`PairSaturation`."""
    plan = PairSaturation.compile(*pair_axes(b, 1))
    acc = np.zeros((b.shape[0], a.shape[0]))
    if plan is not None:
        first, second = pair_axes(a, 1)
        plan.add_to(acc[None], first.T[None], second.T[None])
    return acc.T


def test_pair_saturation_is_what_int16_addition_loses() -> None:
    a = np.array([[255, 255, 1, 2]], np.uint8)
    b = np.array([[127, 127, 5, 5], [10, 10, 10, 10]], np.int8)
    # pair (255*127 + 255*127) = 64770 saturates to 32767; every other pair fits
    np.testing.assert_array_equal(_saturation(a, b), [[32767 - 64770, 0]])


def test_pair_saturation_equals_the_pairwise_definition_on_random_values() -> None:
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, size=(40, 37)).astype(np.uint8)  # odd K: the last product is alone
    b = rng.integers(-128, 128, size=(9, 37)).astype(np.int8)
    pairs = (a[:, None, :36].astype(np.int64).reshape(40, 1, 18, 2)
             * b[None, :, :36].astype(np.int64).reshape(1, 9, 18, 2))
    sums = pairs.sum(axis=-1)
    want = (np.clip(sums, INT16_MIN, INT16_MAX) - sums).sum(axis=-1)
    assert np.count_nonzero(want) > 10
    np.testing.assert_array_equal(_saturation(a, b), want)


def test_exact_product_splits_a_reduction_beyond_float32() -> None:
    rng = np.random.default_rng(4)
    w = rng.integers(-127, 128, size=(3, 3000)).astype(np.int32)  # 255 * sum|w| far above 2**24
    x = rng.integers(-255, 256, size=(3000, 5)).astype(np.int64)
    product = ExactProduct.compile(w, 255)
    assert len(product.chunks) > 1
    np.testing.assert_array_equal(product(x.astype(np.float32)), w.astype(np.int64) @ x)


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


_MS = "com.microsoft"


def _one_node(node: onnx.NodeProto, inputs: dict[str, np.ndarray], constants: dict[str, np.ndarray],
              out_type: int = TensorProto.UINT8) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                      for k, v in inputs.items()],
        [helper.make_tensor_value_info(node.output[0], out_type, None)],
        [numpy_helper.from_array(v, k) for k, v in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(_MS, 1)])
    model.ir_version = 8
    return model


_Q = {"sa": np.array(0.031, np.float32), "za": np.array(117, np.uint8), "sb": np.array(0.047, np.float32),
      "zb": np.array(3, np.uint8), "sc": np.array(0.052, np.float32), "zc": np.array(128, np.uint8)}
_X = np.random.default_rng(9).integers(0, 256, size=(2, 6, 9, 11)).astype(np.uint8)
_POINTWISE_CASES = {
    "add": (helper.make_node("QLinearAdd", ["a", "sa", "za", "b", "sb", "zb", "sc", "zc"], ["y"], domain=_MS),
            {"b": np.random.default_rng(1).integers(0, 256, size=(2, 6, 9, 11)).astype(np.uint8)}),
    "add per channel": (helper.make_node("QLinearAdd", ["a", "sa", "za", "b", "sb", "zb", "sc", "zc"], ["y"],
                                         domain=_MS), {"b": np.arange(6, dtype=np.uint8).reshape(1, 6, 1, 1) * 40}),
    "add scalar (a table)": (helper.make_node("QLinearAdd", ["a", "sa", "za", "b", "sb", "zb", "sc", "zc"], ["y"],
                                    domain=_MS), {"b": np.array([[[[77]]]], np.uint8)}),
    "mul": (helper.make_node("QLinearMul", ["a", "sa", "za", "b", "sb", "zb", "sc", "zc"], ["y"], domain=_MS),
            {"b": np.random.default_rng(2).integers(0, 256, size=(2, 6, 9, 11)).astype(np.uint8)}),
    "mul scalar first (a table)": (helper.make_node("QLinearMul", ["b", "sb", "zb", "a", "sa", "za", "sc", "zc"],
                                                    ["y"], domain=_MS), {"b": np.array([201], np.uint8)}),
    "concat": (helper.make_node("QLinearConcat", ["sc", "zc", "a", "sa", "za", "b", "sb", "zb", "a", "sc", "zc"],
                                ["y"], domain=_MS, axis=1),
               {"b": np.random.default_rng(3).integers(0, 256, size=(2, 3, 9, 11)).astype(np.uint8)}),
    "global average pool": (helper.make_node("QLinearGlobalAveragePool", ["a", "sa", "za", "sc", "zc"], ["y"],
                                             domain=_MS, channels_last=0), {}),
    "average pool": (helper.make_node("QLinearAveragePool", ["a", "sa", "za", "sc", "zc"], ["y"], domain=_MS,
                                      kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), {}),
    "average pool with pads counted": (helper.make_node(
        "QLinearAveragePool", ["a", "sa", "za", "sc", "zc"], ["y"], domain=_MS, kernel_shape=[3, 2],
        pads=[1, 0, 1, 1], count_include_pad=1), {}),
    "max pool ceil": (helper.make_node("MaxPool", ["a"], ["y"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
                      {}),
    "max pool dilated": (helper.make_node("MaxPool", ["a"], ["y"], kernel_shape=[2, 2], dilations=[2, 1],
                                          pads=[1, 1, 0, 1]), {}),
    "reshape": (helper.make_node("Reshape", ["a", "shape"], ["y"]), {}),
    "transpose": (helper.make_node("Transpose", ["a"], ["y"], perm=[0, 2, 3, 1]), {}),
    "flatten": (helper.make_node("Flatten", ["a"], ["y"], axis=2), {}),
    "unsqueeze": (helper.make_node("Unsqueeze", ["a", "axes"], ["y"]), {}),
}


@pytest.mark.parametrize("name", sorted(_POINTWISE_CASES))
@pytest.mark.parametrize("policy", ["ort-exact", "q31"])
def test_each_pointwise_operator_equals_onnxruntime(name: str, policy: str) -> None:
    """ort-exact: every element equals onnxruntime's; q31: within one step of it (its rounding is integer)."""
    node, extra = _POINTWISE_CASES[name]
    inputs = {"a": _X, **extra}
    constants = {k: v for k, v in _Q.items() if k in node.input and k not in inputs}
    constants |= {"shape": np.array([0, -1, 11], np.int64), "axes": np.array([0, -1], np.int64)}
    model = _one_node(node, inputs, {k: v for k, v in constants.items() if k in node.input})
    want = ort_session(model).run(None, inputs)[0]
    session = InferenceSession(model, policy=policy)
    assert set(session.placement().values()) == {COPROCESSOR}
    got = session.run(None, inputs)[0]
    assert want.shape == got.shape and want.dtype == got.dtype
    if policy == "ort-exact":
        np.testing.assert_array_equal(want, got)
    else:
        assert np.abs(want.astype(np.int32) - got.astype(np.int32)).max() <= 1


@pytest.mark.parametrize("zero", [np.array(117, np.uint8), np.array(-3, np.int8), np.array(40, np.int16)])
@pytest.mark.filterwarnings("error")  # a NaN cast to an integer type warns in numpy
def test_quantize_and_dequantize_at_the_borders_equal_onnxruntime(zero: np.ndarray) -> None:
    x = np.random.default_rng(4).normal(0, 3, size=(2, 5, 7)).astype(np.float32)
    x[0, 0, :5] = [np.inf, -np.inf, 1e30, np.nan, -np.nan]  # onnxruntime writes qmin for NaN
    quantize = _one_node(helper.make_node("QuantizeLinear", ["x", "sa", "za"], ["y"]), {"x": x},
                         {"sa": _Q["sa"], "za": zero}, out_type=helper.np_dtype_to_tensor_dtype(zero.dtype))
    np.testing.assert_array_equal(ort_session(quantize).run(None, {"x": x})[0],
                                  InferenceSession(quantize).run(None, {"x": x})[0])
    dequantize = _one_node(helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["y"]), {"a": _X},
                           {"sa": _Q["sa"], "za": _Q["za"]}, out_type=TensorProto.FLOAT)
    np.testing.assert_array_equal(ort_session(dequantize).run(None, {"a": _X})[0],
                                  InferenceSession(dequantize).run(None, {"a": _X})[0])


def test_a_float_model_cannot_run_at_all_and_says_which_nodes_and_why() -> None:
    model = builders.conv_net()
    with pytest.raises(UnsupportedModelError, match=r"none of the model's .* no coprocessor kernel for Conv.*quantize"):
        InferenceSession(model)


def test_a_node_without_a_kernel_falls_back_to_the_cpu_and_the_listing_says_why(quantised) -> None:
    result, _ = quantised
    session = InferenceSession(result.integer_model())
    fallbacks = session.fallbacks()
    placement = session.placement()
    assert set(fallbacks) == {name for name, place in placement.items() if place == CPU}
    assert all(isinstance(why, str) and why for why in fallbacks.values())
    assert COPROCESSOR in placement.values()


def _chain_model() -> onnx.ModelProto:
    """uint8 -> DequantizeLinear -> x * sigmoid(x) -> QuantizeLinear, and -> HardSwish -> QuantizeLinear."""
    nodes = [
        helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["x"], name="dq"),
        helper.make_node("Sigmoid", ["x"], ["sig"], name="sigmoid"),
        helper.make_node("Mul", ["x", "sig"], ["swish"], name="mul"),
        helper.make_node("QuantizeLinear", ["swish", "sc", "zc"], ["y"], name="q"),
        helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["x2"], name="dq2"),
        helper.make_node("HardSwish", ["x2"], ["hs"], name="hardswish"),
        helper.make_node("QuantizeLinear", ["hs", "sc", "zc"], ["y2"], name="q2"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("a", TensorProto.UINT8, list(_X.shape))],
        [helper.make_tensor_value_info(o, TensorProto.UINT8, None) for o in ("y", "y2")],
        [numpy_helper.from_array(_Q[k], k) for k in ("sa", "za", "sc", "zc")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("policy", ["ort-exact", "q31"])
def test_elementwise_chains_run_as_lookup_tables_equal_to_onnxruntime(policy: str) -> None:
    model = _chain_model()
    session = InferenceSession(model, policy=policy)
    assert sorted(session.lookup_tables().values()) == [("dq", "sigmoid", "mul", "q"), ("dq2", "hardswish", "q2")]
    assert set(session.placement()) == {n.name for n in model.graph.node}
    assert set(session.placement().values()) == {COPROCESSOR}
    for want, got in zip(ort_session(model).run(None, {"a": _X}), session.run(None, {"a": _X}), strict=True):
        np.testing.assert_array_equal(want, got)
    with pytest.raises(InputError, match="coprocessor_outputs"):
        session.run(["sig"], {"a": _X})


def test_a_chain_whose_float_tensor_is_read_elsewhere_is_not_a_table() -> None:
    model = _chain_model()
    model.graph.output.append(helper.make_tensor_value_info("sig", TensorProto.FLOAT, None))
    session = InferenceSession(model)
    assert [members[0] for members in session.lookup_tables().values()] == ["dq2"]
    want = ort_session(model).run(None, {"a": _X})
    for w, g in zip(want, session.run(None, {"a": _X}), strict=True):
        np.testing.assert_array_equal(w, g)


@pytest.mark.parametrize("builder", ["conv_net", "transformer_block"])
def test_power_of_two_scales_make_every_requantisation_a_shift(builder: str) -> None:
    """With power_of_two_scales every scale is 2**k, no integer operator needs a multiplier, and pot
    (shift only) computes exactly what q31 computes; the model stays within a few dB of the default."""
    model = getattr(builders, builder)()
    calib, feeds = builders.calibration(model, 16), builders.calibration(model, 3, seed=5)
    plain = qnnlib.quantize(model, calib)
    pot = qnnlib.quantize(model, calib, config=qnnlib.QuantConfig(power_of_two_scales=True))
    values = {t.name: numpy_helper.to_array(t) for t in pot.model.graph.initializer}
    scales = {n.input[1]: values[n.input[1]] for n in pot.model.graph.node
              if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    odd = [name for name, s in scales.items() if not np.all(np.frexp(s.astype(np.float32))[0] == 0.5)]
    assert scales and not odd
    assert plain.integer_details().needs_multiplier
    assert pot.integer_details().needs_multiplier == ()
    shift, q31 = InferenceSession(pot.model, policy="pot"), InferenceSession(pot.model, policy="q31")
    want = np.concatenate([ort_session(model).run(None, f)[0].ravel() for f in feeds])
    got = []
    for f in feeds:
        a, b = shift.run(None, f)[0], q31.run(None, f)[0]
        np.testing.assert_array_equal(a, b)
        got.append(a.ravel())
    plain_db = sqnr_db(want, np.concatenate([plain.session().run(None, f)[0].ravel() for f in feeds]))
    assert sqnr_db(want, np.concatenate(got)) > plain_db - 6.0
