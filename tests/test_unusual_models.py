"""Models that are valid but unusual: each quantises to correct output or gets a typed error.

The catalogue of issue 6 beyond unreadable files and bad feeds (those are in test_errors.py):
control flow, dynamic shapes everywhere, zero-size tensors, constant activations, old opsets,
integer inputs feeding an embedding. "Correct" is the fuzzer's bound: at every output, the largest
error is at most 10% of the float output's range including zero.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import qnnlib
from qnnlib.coprocessor import InferenceSession
from qnnlib.graph.model_io import make_session
from tests import builders
from tests.conftest import output_errors
from tests.test_fuzz import BOUND


def value(name: str, shape: list[object] | None, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def images(n: int = 8, shape: tuple[int, ...] = (1, 3, 8, 8), seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.random(shape, dtype=np.float32)} for _ in range(n)]


def quantize_and_check(model: onnx.ModelProto, calib: object, feeds: list[dict[str, np.ndarray]],
                       **config: object) -> tuple[qnnlib.QuantResult, float]:
    """Quantise; check the model is untouched and the result valid; return the worst error over ``feeds``."""
    before = model.SerializeToString()
    result = qnnlib.quantize(model, calib, config=qnnlib.QuantConfig(**config))
    assert model.SerializeToString() == before, "the user's model was modified"
    onnx.checker.check_model(result.model)
    session = result.session()
    worst = max(max(output_errors(model, session, f).values()) for f in feeds)
    return result, worst


def precisions(result: qnnlib.QuantResult) -> dict[str, str]:
    return {layer.node: layer.precision for layer in result.report.layers}


# -- control flow: quantised around, subgraphs left float -----------------------------------------
def _with_if(b: builders.GraphBuilder, x: str) -> str:
    branches = []
    for offset, relu in ((100, True), (200, False)):
        sub = builders.GraphBuilder(offset)
        sub.count = offset  # names stay unique across the graph and its subgraphs
        y = sub.conv(x, 4, 4, relu=relu)
        branches.append(helper.make_graph(sub.nodes, f"branch{offset}", [], [value(y, None)], sub.inits))
    b.nodes.append(helper.make_node("If", [b.const(np.array(True), "cond")], ["control"], name="control",
                                    then_branch=branches[0], else_branch=branches[1]))
    return "control"


def _with_loop(b: builders.GraphBuilder, x: str) -> str:
    body = builders.GraphBuilder(3)
    body.count = 300
    y = body.op("Add", ["state", body.const(np.full((1, 4, 8, 8), 0.25, np.float32))])
    body.nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"]))
    inputs = [value("i", [], TensorProto.INT64), value("cond_in", [], TensorProto.BOOL), value("state", [1, 4, 8, 8])]
    outputs = [value("cond_out", [], TensorProto.BOOL), value(y, [1, 4, 8, 8])]
    graph = helper.make_graph(body.nodes, "body", inputs, outputs, body.inits)
    b.nodes.append(helper.make_node("Loop", [b.const(np.array(3, np.int64)), b.const(np.array(True)), x], ["control"],
                                    name="control", body=graph))
    return "control"


def _with_scan(b: builders.GraphBuilder, x: str) -> str:
    rows = b.op("Reshape", [x, b.const(np.array([4, 64], np.int64))])
    body = builders.GraphBuilder(4)
    body.count = 400
    step = body.op("MatMul", ["row", body.const(body.rng.normal(0, 0.1, (64, 64)).astype(np.float32))])
    total = body.op("Add", ["acc", step])
    body.nodes.append(helper.make_node("Identity", [total], ["each"]))
    graph = helper.make_graph(body.nodes, "body", [value("acc", [64]), value("row", [64])],
                              [value(total, [64]), value("each", [64])], body.inits)
    b.nodes.append(helper.make_node("Scan", [b.const(np.zeros(64, np.float32)), rows], ["final", "control"],
                                    name="control", body=graph, num_scan_inputs=1))
    return b.op("Reshape", ["control", b.const(np.array([1, 4, 8, 8], np.int64))])  # type: ignore[return-value]


@pytest.mark.parametrize("build", [_with_if, _with_loop, _with_scan], ids=["If", "Loop", "Scan"])
def test_control_flow_is_quantised_around_and_its_subgraphs_stay_float(build) -> None:  # type: ignore[no-untyped-def]
    b = builders.GraphBuilder()
    x = b.conv("x", 3, 4)
    y = b.conv(build(b, x), 4, 2)
    model = b.model([value("x", [1, 3, 8, 8])], [value(y, [1, 2, 8, 8])])
    result, worst = quantize_and_check(model, images(), images())
    assert worst <= BOUND
    control = next(n for n in result.model.graph.node if n.name == "control")
    original = next(n for n in model.graph.node if n.name == "control")
    for got, want in zip(control.attribute, original.attribute, strict=True):  # shape inference may annotate them
        assert (list(got.g.node), list(got.g.initializer)) == (list(want.g.node), list(want.g.initializer))
    kept = precisions(result)
    assert kept["control"] == "float"
    assert [kept[n.name] for n in model.graph.node if n.op_type == "Conv"] == ["int8", "int8"]


@pytest.mark.parametrize("build", [_with_if, _with_loop, _with_scan], ids=["If", "Loop", "Scan"])
def test_control_flow_runs_on_the_coprocessors_cpu_side(build) -> None:  # type: ignore[no-untyped-def]
    """The If, Loop or Scan runs on the CPU provider, its body reading a tensor the coprocessor wrote.

    Two faults were behind this: the integer model dropped the DequantizeLinear that only the If's
    branches read, and the CPU part's sub-model did not take the tensors its bodies read from
    outside as inputs. ``ort-exact`` now equals onnxruntime on the integer model.
    """
    b = builders.GraphBuilder()
    y = b.conv(build(b, b.conv("x", 3, 4)), 4, 2)
    model = b.model([value("x", [1, 3, 8, 8])], [value(y, [1, 2, 8, 8])])
    result = qnnlib.quantize(model, images())
    integer = result.integer_model()
    onnx.checker.check_model(integer)
    session = InferenceSession(integer)
    assert session.placement()["control"] == "CPUExecutionProvider"
    assert "Conv" not in [n.op_type for n in integer.graph.node]
    for feed in images(3, seed=5):
        np.testing.assert_array_equal(session.run(None, feed)[0], make_session(integer).run(None, feed)[0])


# -- shapes -------------------------------------------------------------------------------------
def _dynamic_model() -> onnx.ModelProto:
    b = builders.GraphBuilder()
    pooled = b.op("GlobalAveragePool", [b.conv("x", 3, 4)])
    y = b.linear(b.op("Flatten", [pooled]), 4, 3)  # type: ignore[arg-type]
    return b.model([value("x", ["N", 3, "H", "W"])], [value(y, ["N", 3])])


def test_dynamic_shapes_everywhere() -> None:
    """Symbolic batch, height and width: calibrated at several sizes, run at yet another."""
    model = _dynamic_model()
    rng = np.random.default_rng(0)
    calib = [{"x": rng.random((1 + i % 2, 3, 6 + i, 9 - i), dtype=np.float32)} for i in range(6)]
    result, worst = quantize_and_check(model, calib, calib)
    assert worst <= BOUND
    assert result.session().run(None, {"x": rng.random((3, 3, 17, 5), dtype=np.float32)})[0].shape == (3, 3)


def test_dynamic_shapes_with_generated_calibration() -> None:
    normal = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)
    result, worst = quantize_and_check(_dynamic_model(), None, [{"x": normal}])
    assert result.report.calibration.generated and worst <= BOUND


def test_zero_size_tensor_inside_the_graph() -> None:
    """A Slice that keeps no channel feeds a Concat: the empty tensor is carried through."""
    b = builders.GraphBuilder()
    x = b.conv("x", 3, 4)
    empty = b.op("Slice", [x, *(b.const(np.array([v], np.int64)) for v in (0, 0, 1))])
    y = b.conv(b.op("Concat", [x, empty], axis=1), 4, 2)  # type: ignore[arg-type]
    model = b.model([value("x", [1, 3, 8, 8])], [value(y, [1, 2, 8, 8])])
    _, worst = quantize_and_check(model, images(), images())
    assert worst <= BOUND


# -- constant activations -------------------------------------------------------------------------
def test_constant_zero_activation_keeps_its_readers_bias_exact() -> None:
    """A tensor that is always 0 (zero range): the Conv reading it outputs its bias.

    With onnxruntime's choice of scale 1 for such a tensor the bias is quantised at step ``s_w``,
    an error of 7% of the output range here; qnnlib's [0, 1] grid keeps it to output rounding.
    """
    b = builders.GraphBuilder()
    zero = b.op("Mul", ["x", b.const(np.zeros(1, np.float32))])
    y = b.conv(b.conv(zero, 3, 4), 4, 2)  # type: ignore[arg-type]
    model = b.model([value("x", [1, 3, 8, 8])], [value(y, [1, 2, 8, 8])])
    _, worst = quantize_and_check(model, images(), images())
    assert worst <= 0.01


def test_near_dead_channel_keeps_its_large_bias() -> None:
    """A channel with weights near 1e-9 and a bias of 5 (PP-OCRv5's detector has 700 such values).

    At ``s_in * s_w`` the bias needs far more than 32 bits; clamped, it would come out near 0.
    qnnlib raises that channel's weight scale instead, so nothing is clamped and the output holds.
    """
    b = builders.GraphBuilder()
    w = b.rng.normal(0, 0.3, (2, 3, 3, 3)).astype(np.float32)
    w[1] *= 1e-8
    y = b.op("Conv", ["x", b.const(w, "w"), b.const(np.array([0.1, 5.0], np.float32), "b")], pads=[1, 1, 1, 1])
    model = b.model([value("x", [1, 3, 8, 8])], [value(y, [1, 2, 8, 8])])  # type: ignore[arg-type]
    result, worst = quantize_and_check(model, images(), images())
    assert not any("overflowed" in n for n in result.report.notes)
    assert worst <= 0.01


# -- a Log's input cone ---------------------------------------------------------------------------
def _audio_front_end() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """Audio -> STFT as two strided Convs (cos, sin) -> power -> Log -> a Conv; tones 60 dB apart."""
    b = builders.GraphBuilder()
    n_fft, hop, bins = 64, 32, 33
    t = np.arange(n_fft)
    window = np.hanning(n_fft)
    freqs = np.arange(bins)[:, None]
    cos = (np.cos(2 * np.pi * freqs * t / n_fft) * window)[:, None, :].astype(np.float32)
    sin = (np.sin(2 * np.pi * freqs * t / n_fft) * window)[:, None, :].astype(np.float32)
    re = b.op("Conv", ["x", b.const(cos, "cos")], strides=[hop])
    im = b.op("Conv", ["x", b.const(sin, "sin")], strides=[hop])
    power = b.op("Add", [b.op("Mul", [re, re]), b.op("Mul", [im, im])])  # type: ignore[list-item]
    log = b.op("Log", [b.op("Add", [power, b.const(np.array(1e-10, np.float32), "eps")])])  # type: ignore[list-item]
    w = b.rng.normal(0, 0.1, (8, bins, 3)).astype(np.float32)
    y = b.op("Conv", [log, b.const(w, "w"), b.const(np.zeros(8, np.float32), "b")], pads=[1, 1])  # type: ignore[list-item]
    model = b.model([value("x", [1, 1, 2048])], [value(y, [1, 8, 63])])  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    s = np.arange(2048)
    feeds = [{"x": (0.9 * np.sin(2 * np.pi * rng.uniform(3, 10) * s / 64) + 1e-3 * np.sin(2 * np.pi * 20 * s / 64)
                    + 1e-4 * rng.standard_normal(2048)).astype(np.float32)[None, None]} for _ in range(8)]
    return model, feeds


def test_an_audio_front_end_stays_float() -> None:
    """Quantised, the quiet bins become zeros and their log garbage; the cone up to the Log stays float."""
    model, feeds = _audio_front_end()
    result, kept = quantize_and_check(model, feeds, feeds)
    assert {layer.precision for layer in result.report.layers if layer.op_type in ("Mul", "Add")} == {"float"}
    stft = [layer for layer in result.report.layers if layer.op_type == "Conv"][:2]
    assert all(layer.precision == "float" and "feeds Log" in layer.note for layer in stft)
    assert precisions(result)[model.graph.node[-1].name] == "int8"  # the Conv after the Log
    _, quantised = quantize_and_check(model, feeds, feeds, float_log_inputs=False)
    assert kept <= 0.02 < quantised


def test_a_log_of_a_softmax_keeps_only_the_softmax_float() -> None:
    b = builders.GraphBuilder()
    y = b.conv(b.conv("x", 3, 4), 4, 4, relu=False)
    probs = b.op("Softmax", [y], axis=1)
    out = b.op("Log", [probs])  # type: ignore[list-item]
    model = b.model([value("x", [1, 3, 8, 8])], [value(out, [1, 4, 8, 8])])  # type: ignore[arg-type]
    result, _ = quantize_and_check(model, images(), images())
    reasons = {layer.node: layer.note for layer in result.report.layers}
    softmax = next(n.name for n in model.graph.node if n.op_type == "Softmax")
    assert "feeds Log" in reasons[softmax]
    assert all(layer.precision == "int8" for layer in result.report.layers if layer.op_type == "Conv")


# -- already quantised models ---------------------------------------------------------------------
def test_a_quantised_model_is_left_as_it_is_and_said_so() -> None:
    """qnnlib's own QDQ output, quantised again: no second quantisation, a note and a reason per node."""
    model = builders.conv_net()
    calib = builders.calibration(model)
    first = qnnlib.quantize(model, calib)
    again, worst = quantize_and_check(first.model, calib, calib[:2])
    assert worst == 0.0
    assert not again.report.quantized_layers
    assert any("already quantised" in n for n in again.report.notes)
    conv = next(layer for layer in again.report.layers if layer.op_type == "Conv")
    assert "DequantizeLinear" in conv.note


def test_a_dynamically_quantised_model_is_recognised(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """onnxruntime's quantize_dynamic output (DynamicQuantizeLinear, MatMulInteger): its float ops stay float."""
    from onnxruntime.quantization import quantize_dynamic

    model = builders.mlp()
    onnx.save(model, tmp_path / "mlp.onnx")
    quantize_dynamic(tmp_path / "mlp.onnx", tmp_path / "dynamic.onnx")
    dynamic = onnx.load(tmp_path / "dynamic.onnx")
    calib = builders.calibration(model)
    result, worst = quantize_and_check(dynamic, calib, calib[:2])
    note = next(n for n in result.report.notes if "already quantised" in n)
    assert "DynamicQuantizeLinear" in note and "MatMulInteger" in note
    assert worst == 0.0


@pytest.mark.parametrize("fill", [0.0, 0.5])
def test_constant_calibration_input(fill: float) -> None:
    model = builders.conv_net()
    calib = [{"input": np.full((1, 3, 16, 16), fill, np.float32)}] * 4
    _, worst = quantize_and_check(model, calib, calib[:1])
    assert worst <= BOUND


# -- opsets -------------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [7, 10])
def test_old_opset_is_upgraded_and_quantised(opset: int) -> None:
    """Opsets below 13 (per-channel DequantizeLinear) are converted; Clip still has attribute bounds there."""
    b = builders.GraphBuilder()
    y = b.op("Clip", [b.conv("x", 3, 4)], min=0.0, max=0.5)
    y = b.op("Flatten", [b.op("GlobalAveragePool", [y])])  # type: ignore[list-item]
    model = b.model([value("x", [1, 3, 8, 8])], [value(y, [1, 4])], opset=opset)  # type: ignore[arg-type]
    result, worst = quantize_and_check(model, images(), images())
    assert worst <= BOUND
    assert [o.version for o in result.model.opset_import if o.domain in ("", "ai.onnx")] == [13]
    assert precisions(result)[model.graph.node[0].name] == "int8"


# -- integer inputs -------------------------------------------------------------------------------
def _embedding_model() -> onnx.ModelProto:
    b = builders.GraphBuilder()
    table = b.const(b.rng.normal(0, 1, (100, 16)).astype(np.float32), "embedding")
    y = b.linear(b.op("Gather", [table, "ids"]), 16, 8)  # type: ignore[arg-type]
    return b.model([value("ids", ["N", "T"], TensorProto.INT64)], [value(y, ["N", "T", 8])])


def test_token_ids_feeding_an_embedding() -> None:
    rng = np.random.default_rng(0)
    calib = [{"ids": rng.integers(0, 100, (1, 7))} for _ in range(8)]
    result, worst = quantize_and_check(_embedding_model(), calib, calib)
    assert worst <= BOUND
    assert precisions(result)[next(n.name for n in result.model.graph.node if n.op_type == "MatMul")] == "int8"


def test_generated_token_ids_stay_inside_the_embedding() -> None:
    result, worst = quantize_and_check(_embedding_model(), None, [{"ids": np.arange(100).reshape(4, 25)}])
    assert worst <= BOUND
    assert any("indices of a 100-row embedding" in note for note in result.report.calibration.generation)


def test_token_ids_outside_the_embedding_name_the_node() -> None:
    with pytest.raises(qnnlib.SessionError, match="Gather"):
        qnnlib.quantize(_embedding_model(), [{"ids": np.array([[5, 300]], np.int64)}])


def test_bytes_cast_to_float_before_the_first_layer() -> None:
    b = builders.GraphBuilder()
    y = b.conv(b.op("Cast", ["pixels"], to=TensorProto.FLOAT), 3, 4)  # type: ignore[arg-type]
    model = b.model([value("pixels", ["N", 3, 8, 8], TensorProto.UINT8)], [value(y, ["N", 4, 8, 8])])
    rng = np.random.default_rng(0)
    calib = [{"pixels": rng.integers(0, 256, (1, 3, 8, 8), dtype=np.uint8)} for _ in range(8)]
    _, worst = quantize_and_check(model, calib, calib[:2])
    assert worst <= BOUND
