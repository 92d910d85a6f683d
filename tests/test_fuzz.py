"""Fuzzed graphs (tests/fuzz.py): every drawn model quantises, stays valid, and stays near float.

The bound: at every output, over the 8 calibration samples run as one batch of 8 (the model was
calibrated one sample at a time, so the dynamic batch dimension is exercised), the largest absolute
error is at most :data:`BOUND` of the output's float range including zero. A saturating integer
kernel, a wrongly tied group or a broken fusion gives errors of the size of the range itself; the
worst case of 3000 graphs after the fixes recorded in the regression tests below was 0.04.

Some graphs exceed the bound under any 8-bit quantiser: a layer whose output varies far less than
its inputs' rounding (cancellation), or a narrow slice of a wide per-tensor grid. An output over
the bound passes when it is the grid's limit, not a fault (:func:`beyond_the_grid`): onnxruntime's
integer kernels add nothing to the same model's error with its Q/DQ run in float (a saturating or
broken kernel would), and onnxruntime's own quantiser (``quantize_static``, QDQ, per channel,
min-max) does as badly on the same graph and data (a wrong tie or range would not). The check
still fails the faults found so far: pair saturation (0.31-0.45 with float Q/DQ near 0.01) and the
untied Concat (0.29 against onnxruntime's 0.075).

``QNNLIB_FUZZ_EXAMPLES`` sets how many graphs (default 200); ``benchmarks/fuzz_graphs.py`` runs more.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from onnx import TensorProto, helper, numpy_helper

import qnnlib
from qnnlib import planner
from qnnlib.coprocessor import InferenceSession
from qnnlib.graph import tying
from tests import builders, fuzz
from tests.conftest import optimized_op_types, output_errors, session

#: Largest error at an output as a share of its float range (including zero).
BOUND = 0.1
#: An output over the bound passes when its error is at most this many times both its error with
#: float Q/DQ and the error of onnxruntime's quantiser (:func:`beyond_the_grid`).
PEER_MARGIN = 1.25
EXAMPLES = int(os.environ.get("QNNLIB_FUZZ_EXAMPLES", "200"))


def _batch(case: fuzz.FuzzCase) -> dict[str, np.ndarray]:
    feeds = case.feeds(8, batch=1, seed=1)
    return {k: np.concatenate([f[k] for f in feeds]) for k in case.input_shapes}


def relative_errors(case: fuzz.FuzzCase, result: qnnlib.QuantResult) -> dict[str, float]:
    """:func:`output_errors` over the 8 calibration samples as one batch."""
    return output_errors(case.model, result.session(), _batch(case))


def peer_errors(case: fuzz.FuzzCase) -> dict[str, float]:
    """:func:`relative_errors` of onnxruntime's ``quantize_static`` on the same graph and calibration data."""
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(case.feeds(8, batch=1, seed=1))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory() as tmp:
        source, target = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "ort.onnx")
        onnx.save(case.model, source)
        quantize_static(source, target, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        peer = ort.InferenceSession(target, providers=["CPUExecutionProvider"])
        return output_errors(case.model, peer, _batch(case))


def simulated_errors(case: fuzz.FuzzCase, result: qnnlib.QuantResult) -> dict[str, float]:
    """:func:`relative_errors` of qnnlib's model run as written, its Q/DQ in float (no integer kernel)."""
    plain = session(result.model, graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return output_errors(case.model, plain, _batch(case))


def beyond_the_grid(case: fuzz.FuzzCase, result: qnnlib.QuantResult,
                    errors: dict[str, float]) -> dict[str, tuple[float, float, float]]:
    """Outputs over :data:`BOUND` that are not the grid's limit: ``{output: (error, simulated, onnxruntime's)}``.

    The grid's limit: onnxruntime's integer kernels add nothing to the error of the same model with
    its Q/DQ run in float (no saturation, no broken fusion), and onnxruntime's own quantiser does as
    badly (no wrong tie, no bad range), each within :data:`PEER_MARGIN`. Empty when every output passes.
    """
    over = {o: e for o, e in errors.items() if e > BOUND}
    if not over:
        return {}
    simulated, peer = simulated_errors(case, result), peer_errors(case)
    return {o: (e, simulated[o], peer[o]) for o, e in over.items()
            if e > PEER_MARGIN * simulated[o] or e > PEER_MARGIN * peer[o]}


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(fuzz.graphs())
def test_fuzzed_graph_quantises_within_bound(case: fuzz.FuzzCase) -> None:
    before = case.model.SerializeToString()
    result = qnnlib.quantize(case.model, case.feeds(8, batch=1, seed=1))
    assert case.model.SerializeToString() == before, "the user's model was modified"
    onnx.checker.check_model(result.model)
    failing = beyond_the_grid(case, result, relative_errors(case, result))
    assert not failing, (f"errors (qnnlib, its Q/DQ in float, onnxruntime's quantiser) over {BOUND} of the "
                         f"range: {failing}; ops {case.ops}")


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], inputs: dict[str, list[object]],
           outputs: list[str]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "regression",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)  # gives the outputs their shapes


def _case(model: onnx.ModelProto) -> fuzz.FuzzCase:
    shapes = {i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim[1:]) for i in model.graph.input}
    return fuzz.FuzzCase(model, shapes, ())


def _worst(model: onnx.ModelProto, **config: object) -> float:
    case = _case(model)
    result = qnnlib.quantize(model, case.feeds(8, batch=1, seed=1), config=qnnlib.QuantConfig(**config))
    return max(relative_errors(case, result).values())


# -- regressions: each was found by the fuzzer ----------------------------------------------------
def test_a_model_with_nothing_to_observe_calibrates() -> None:
    """Two inputs read only by Relus: nothing is observed, and onnxruntime's run([]) returns every output."""
    model = _model([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["y"], ["b"])], [],
                   {"x": ["N", 1, 3, 3], "y": ["N", 1, 3, 3]}, ["a", "b"])
    case = _case(model)
    result = qnnlib.quantize(model, case.feeds(8, batch=1, seed=1))
    assert max(relative_errors(case, result).values()) == 0.0


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


@pytest.mark.parametrize(("c_in", "m_out", "group"), [(1, 5, 1), (2, 1, 1), (3, 8, 1), (4, 8, 4)])
def test_no_weight_pair_saturates_x86_kernels(c_in: int, m_out: int, group: int) -> None:
    """Same-sign weights: x86 AVX2 kernels add neighbouring products in int16 and saturate past 32767.

    The pairs run over (kernel offset, input channel), channels fastest: one input channel with
    several outputs pairs neighbouring offsets; three channels pair across offsets. The default
    overflow fix ("pairs") keeps every pair within 255 * 128; without it the error is of the size
    of the output.
    """
    w = np.full((m_out, c_in // group, 3, 3), 1.0, np.float32) / np.sqrt(9 * c_in // group)
    model = _model([helper.make_node("Add", ["x", "half"], ["a"]),  # not a model input: "first_layer" would miss it
                    helper.make_node("Conv", ["a", "w"], ["y"], group=group)], [_const("w", w),
                                                                                _const("half", np.float32(0.5))],
                   {"x": ["N", c_in, 6, 6]}, ["y"])
    assert _worst(model) <= BOUND
    rows = np.moveaxis(w, 1, -1).reshape(m_out, -1)
    result = qnnlib.quantize(model, _case(model).feeds(8, batch=1, seed=1))
    plan = next(p for p in result.plan.weights if p.kind == "weight")
    q = np.rint(rows / np.asarray(plan.scales, np.float32)[:, None])
    even = q.shape[1] - q.shape[1] % 2
    assert np.abs(q[:, :even].reshape(m_out, -1, 2)).sum(axis=2).max() <= 128


@pytest.mark.parametrize(("c_in", "m_out", "group"), [(1, 5, 1), (3, 8, 1), (5, 6, 1), (4, 8, 4), (6, 6, 2)])
def test_coprocessor_matches_saturating_kernels(c_in: int, m_out: int, group: int) -> None:
    """With the overflow fix off, onnxruntime saturates; ort-exact reproduces it value for value."""
    rng = np.random.default_rng(0)
    w = (np.abs(rng.standard_normal((m_out, c_in // group, 3, 3))) + 0.5).astype(np.float32)
    model = _model([helper.make_node("Conv", ["x", "w"], ["y"], group=group, pads=[1, 1, 1, 1])], [_const("w", w)],
                   {"x": [1, c_in, 6, 6]}, ["y"])
    feeds = [{"x": np.abs(rng.standard_normal((1, c_in, 6, 6))).astype(np.float32) * 4} for _ in range(4)]
    result = qnnlib.quantize(model, feeds, config=qnnlib.QuantConfig(overflow_fix="disable"))
    want, got = result.session().run(None, feeds[0])[0], InferenceSession(result.model).run(None, feeds[0])[0]
    np.testing.assert_array_equal(want, got)


def test_softmax_output_grid_reaches_one() -> None:
    """onnxruntime's QLinearSoftmax (1.31) writes 0 everywhere when the output grid stops short of 1."""
    model = _model([helper.make_node("GlobalAveragePool", ["x"], ["g"]),
                    helper.make_node("Reshape", ["g", "shape"], ["r"]),
                    helper.make_node("Softmax", ["r"], ["s"], axis=-1),
                    helper.make_node("MatMul", ["s", "w"], ["y"])],
                   [numpy_helper.from_array(np.array([0, -1], np.int64), "shape"),
                    _const("w", np.linspace(-1, 1, 12).reshape(3, 4))], {"x": ["N", 3, 4, 4]}, ["y"])
    assert _worst(model) <= BOUND


def test_softmax_over_an_axis_of_size_one() -> None:
    """Softmax after GlobalAveragePool over its size-1 last axis is always 1; QLinearSoftmax returned 0."""
    model = _model([helper.make_node("Conv", ["x", "w1"], ["c"]),
                    helper.make_node("GlobalAveragePool", ["c"], ["g"]),
                    helper.make_node("Softmax", ["g"], ["s"], axis=-1),
                    helper.make_node("Conv", ["s", "w2"], ["y"])],
                   [_const("w1", np.linspace(-1, 1, 4 * 3 * 9).reshape(4, 3, 3, 3)),
                    _const("w2", np.linspace(-1, 1, 8).reshape(2, 4, 1, 1))], {"x": ["N", 3, 6, 6]}, ["y"])
    assert _worst(model) <= 0.01
    result = qnnlib.quantize(model, _case(model).feeds(2, batch=1, seed=1))
    assert "Softmax" not in {n.op_type for n in result.model.graph.node}
    assert any("Softmax over an axis of size 1" in note for note in result.report.notes)


@pytest.mark.parametrize("channels", [4, 16, 64])
def test_softmax_over_long_rows_keeps_its_small_probabilities(channels: int,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Softmax over 256 to 4096 values: every probability is below 0.12, and at 1/256 most round to 0.

    The fuzzer's last failure class (error 0.149 over rows of about 1000). The output grid now
    reaches the calibrated maximum (errors 0.018, 0.017, 0.073 against 0.053, 0.059, 0.213 at
    1/256), and onnxruntime still fuses QLinearSoftmax.
    """
    rng = np.random.default_rng(0)
    model = _model([helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
                    helper.make_node("Flatten", ["c"], ["f"]),
                    helper.make_node("Softmax", ["f"], ["s"], axis=-1),
                    helper.make_node("MatMul", ["s", "w2"], ["y"])],
                   [_const("w1", rng.normal(0, 0.3, (channels, 3, 3, 3))),
                    _const("w2", rng.normal(0, 1, (channels * 64, 4)))], {"x": ["N", 3, 8, 8]}, ["y"])
    result = qnnlib.quantize(model, _case(model).feeds(8, batch=1, seed=1))
    params = next(g.params for g in result.plan.groups if "s" in g.members)
    assert params.scale < 1 / 256 and params.range[1] < 0.5
    assert optimized_op_types(result.model)["QLinearSoftmax"] == 1
    fine = _worst(model)
    monkeypatch.setattr(planner, "softmax_steps", lambda *_, **__: 256)
    coarse = _worst(model)
    assert fine <= BOUND and fine <= coarse / 2


def test_clip_does_not_fold_into_a_group_another_reader_needs() -> None:
    """Concat(x, x) -> Clip: folding would clip x itself, which a MatMul also reads."""
    model = _model([helper.make_node("Concat", ["x", "x"], ["c"], axis=1),
                    helper.make_node("Clip", ["c", "lo", "hi"], ["k"]),
                    helper.make_node("Conv", ["k", "wc"], ["y1"]),
                    helper.make_node("Reshape", ["x", "shape"], ["r"]),
                    helper.make_node("MatMul", ["r", "wm"], ["y2"])],
                   [_const("lo", np.float32(0.0)), _const("hi", np.float32(6.0)),
                    _const("wc", np.ones((2, 2, 1, 1)) * 0.5), numpy_helper.from_array(np.array([0, -1], np.int64),
                                                                                        "shape"),
                    _const("wm", np.linspace(-1, 1, 9 * 3).reshape(9, 3))], {"x": ["N", 1, 3, 3]}, ["y1", "y2"])
    assert _worst(model) <= BOUND


def test_a_chain_of_folded_activations_stays_connected() -> None:
    """Conv -> Relu -> Relu -> Conv: both Relus are dropped and the second Conv still has its input."""
    model = _model([helper.make_node("Conv", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
                    helper.make_node("Relu", ["b"], ["c"]), helper.make_node("Conv", ["c", "w2"], ["y"])],
                   [_const("w1", np.full((2, 2, 1, 1), 0.5)), _const("w2", np.full((2, 2, 1, 1), 0.5))],
                   {"x": ["N", 2, 4, 4]}, ["y"])
    case = _case(model)
    result = qnnlib.quantize(model, case.feeds(8, batch=1, seed=1))
    assert not any(n.op_type == "Relu" for n in result.model.graph.node)
    assert max(relative_errors(case, result).values()) <= BOUND


def _softmax_concat_model() -> onnx.ModelProto:
    """Softmax(x) over 64 values, read by a MatMul and concatenated with x (range about +-3) for another."""
    rng = np.random.default_rng(0)
    return _model([helper.make_node("Softmax", ["x"], ["p"], axis=-1),
                   helper.make_node("Concat", ["p", "x"], ["c"], axis=-1),
                   helper.make_node("MatMul", ["c", "w1"], ["y1"]),
                   helper.make_node("MatMul", ["p", "w2"], ["y2"])],
                  [_const("w1", rng.normal(size=(128, 8))), _const("w2", rng.normal(size=(64, 8)))],
                  {"x": ["N", 4, 64]}, ["y1", "y2"])


def test_a_narrow_concat_input_read_elsewhere_keeps_its_own_grid(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Tied to the Concat, the probabilities (about 1/64) sat on x's grid (step about 0.03) and the
    MatMul reading them directly lost them (error 0.29 of the range in the fuzzed graph)."""
    model = _softmax_concat_model()
    case = _case(model)
    with caplog.at_level("INFO", logger="qnnlib.prepare"):
        result = qnnlib.quantize(model, case.feeds(8, batch=1, seed=1))
    assert "input 'p' keeps its own parameters" in caplog.text
    assert result.plan.group_of("p") is not result.plan.group_of("c")
    assert result.plan.group_of("x") is result.plan.group_of("c")  # the wide input stays tied
    assert optimized_op_types(result.model)["QLinearConcat"] == 1  # a scale per input: still one integer kernel
    integer = ort.InferenceSession(result.integer_model().SerializeToString(), providers=["CPUExecutionProvider"])
    feed = case.feeds(1, batch=1, seed=2)[0]
    assert all(np.array_equal(a, b) for a, b in zip(result.session().run(None, feed), integer.run(None, feed),
                                                     strict=True))
    untied = max(relative_errors(case, result).values())
    monkeypatch.setattr(tying, "NARROW_FRACTION", 0.0)
    tied = _worst(model)
    assert untied <= BOUND < tied


def test_concat_inputs_read_only_by_the_concat_stay_tied() -> None:
    """Without another reader nothing is gained: the Concat's output holds the input coarsely either way."""
    model = _softmax_concat_model()
    del model.graph.node[3]  # the second MatMul
    del model.graph.output[1]
    result = qnnlib.quantize(model, _case(model).feeds(8, batch=1, seed=1))
    assert result.plan.group_of("p") is result.plan.group_of("c")


def test_the_grid_limit_check_still_fails_known_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Saturation (onnxruntime's quantiser shares it; float Q/DQ does not) and the tied narrow Concat input
    (float Q/DQ shares it; onnxruntime's quantiser does not) both fail the check; the fixed models pass."""
    w = np.full((8, 3, 3, 3), 1.0, np.float32) / np.sqrt(27)
    saturating = _model([helper.make_node("Add", ["x", "half"], ["a"]), helper.make_node("Conv", ["a", "w"], ["y"])],
                        [_const("w", w), _const("half", np.float32(0.5))], {"x": ["N", 3, 6, 6]}, ["y"])
    concat = _softmax_concat_model()
    for model, fault in ((saturating, {"overflow_fix": "disable"}), (concat, {})):
        case = _case(model)
        fixed = qnnlib.quantize(model, case.feeds(8, batch=1, seed=1))
        assert not beyond_the_grid(case, fixed, relative_errors(case, fixed))
        with monkeypatch.context() as patch:
            patch.setattr(tying, "NARROW_FRACTION", 0.0)
            faulty = qnnlib.quantize(model, case.feeds(8, batch=1, seed=1), config=qnnlib.QuantConfig(**fault))
        assert beyond_the_grid(case, faulty, relative_errors(case, faulty))


# -- determinism --------------------------------------------------------------------------------
_IN_PROCESS = """
import sys, hashlib, qnnlib
from tests import builders
model = builders.conv_net()
result = qnnlib.quantize(model, builders.calibration(model, 8))
sys.stdout.write(hashlib.sha256(result.model.SerializeToString()).hexdigest())
"""


def test_same_input_gives_the_same_bytes_across_processes() -> None:
    import hashlib

    model = builders.conv_net()
    here = hashlib.sha256(qnnlib.quantize(model, builders.calibration(model, 8)).model.SerializeToString()).hexdigest()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "PYTHONHASHSEED": "123"}
    there = subprocess.run([sys.executable, "-c", _IN_PROCESS], capture_output=True, text=True, check=True,
                           cwd=root, env=env).stdout
    assert here == there
