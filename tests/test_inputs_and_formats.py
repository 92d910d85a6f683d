"""Every calibration form, every model form the issue names, and what must survive a round trip."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qnnlib
from qnnlib.graph import model_io
from qnnlib.graph.model_io import load_model
from tests import builders
from tests.conftest import optimized_op_types, run, sqnr_db


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return builders.conv_net()


@pytest.fixture(scope="module")
def feeds(model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    return builders.calibration(model, 8)


@pytest.fixture(scope="module")
def reference(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> bytes:
    return qnnlib.quantize(model, feeds).model.SerializeToString()


class Reader:
    """onnxruntime's CalibrationDataReader interface."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.it, None)


# -- calibration forms: every form of the same data gives the same model --------------------------
@pytest.mark.parametrize(
    "form",
    ["list-of-dicts", "generator", "reader", "stacked-ndarray", "list-of-ndarrays", "tuple"],
)
def test_calibration_forms_agree(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], reference: bytes,
                                 form: str) -> None:
    arrays = [f["input"] for f in feeds]
    calib: object = {
        "list-of-dicts": feeds,
        "generator": (f for f in feeds),
        "reader": Reader(feeds),
        "stacked-ndarray": np.stack(arrays),
        "list-of-ndarrays": arrays,
        "tuple": tuple(feeds),
    }[form]
    result = qnnlib.quantize(model, calib)
    assert result.model.SerializeToString() == reference
    assert not result.report.calibration.generated
    assert result.report.calibration.samples == len(feeds)


def test_generator_is_read_once(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> None:
    reads = []

    def gen():  # type: ignore[no-untyped-def]
        for i, f in enumerate(feeds):
            reads.append(i)
            yield f

    result = qnnlib.quantize(model, gen())
    assert reads == list(range(len(feeds)))
    assert result.report.evaluation_samples == min(qnnlib.QuantConfig().report_samples, len(feeds))


def test_single_mapping_is_one_sample(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> None:
    result = qnnlib.quantize(model, feeds[0])
    assert result.report.calibration.samples == 1


def test_max_calibration_samples(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> None:
    result = qnnlib.quantize(model, iter(feeds), config=qnnlib.QuantConfig(max_calibration_samples=3))
    assert result.report.calibration.samples == 3


def test_generated_data_is_reported(model: onnx.ModelProto) -> None:
    result = qnnlib.quantize(model, None)
    assert result.report.calibration.generated
    assert "GENERATED" in result.report.to_text()
    assert any("generated" in n.lower() for n in result.report.notes)
    onnx.checker.check_model(result.model)


def test_dynamic_batch_and_generated_data() -> None:
    mlp = builders.mlp()
    result = qnnlib.quantize(mlp, None)
    out = result.session().run(None, {"x": np.ones((5, 32), np.float32)})[0]
    assert out.shape == (5, 8)


def test_negative_dims_are_dynamic() -> None:
    """Paddle exports declare unknown dimensions as -1 (PP-OCR's angle classifier: [-1, 3, ?, ?])."""
    model = builders.conv_net()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for d in (dims[0], dims[2], dims[3]):
        d.dim_value = -1
    data = [{"input": np.random.default_rng(i).normal(size=(1, 3, 16, 16)).astype(np.float32)} for i in range(4)]
    result = qnnlib.quantize(model, data)
    assert result.report.quantized_layers
    generated = qnnlib.quantize(model, None)
    assert generated.report.calibration.generated
    assert generated.session().run(None, data[0])[0].shape == (1, 10)


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_every_method_runs(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], method: str) -> None:
    result = qnnlib.quantize(model, feeds, config=qnnlib.QuantConfig(method=method))
    assert result.report.calibration.method == method
    assert result.report.outputs[0].sqnr_db > 10


# -- model forms ---------------------------------------------------------------------------------------
def _old_opset_model(opset: int) -> onnx.ModelProto:
    """Conv + Relu + MaxPool + Conv at an old opset, weights as graph inputs with initializers (IR 3 style)."""
    rng = np.random.default_rng(3)
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (4, 2, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 1, 1)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8]),
              helper.make_tensor_value_info("w1", TensorProto.FLOAT, [4, 2, 3, 3]),
              helper.make_tensor_value_info("w2", TensorProto.FLOAT, [4, 4, 1, 1])]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])
    graph = helper.make_graph(nodes, "old", inputs, [output], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=3)


@pytest.mark.parametrize("opset", [7, 9, 11])
def test_old_opset_gives_valid_per_channel_model(opset: int) -> None:
    old = _old_opset_model(opset)
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 2, 8, 8)).astype(np.float32)} for i in range(8)]
    result = qnnlib.quantize(old, feeds)
    onnx.checker.check_model(result.model)
    assert any(op.domain in ("", "ai.onnx") and op.version >= 13 for op in result.model.opset_import)
    dq_axes = [a.i for n in result.model.graph.node if n.op_type == "DequantizeLinear"
               for a in n.attribute if a.name == "axis"]
    assert dq_axes, "weights should be per channel"
    assert optimized_op_types(result.model)["QLinearConv"] == 2
    assert sqnr_db(run(old, feeds[0])[0], result.session().run(None, feeds[0])[0]) > 25


def test_constant_node_weights_are_weights() -> None:
    """Paddle exports keep weights in Constant nodes."""
    rng = np.random.default_rng(4)
    w = rng.normal(0, 0.3, (4, 2, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.1, (4,)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
        helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(b, "b")),
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "paddle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=6)
    feeds = [{"x": rng.standard_normal((1, 2, 8, 8)).astype(np.float32)} for _ in range(8)]
    result = qnnlib.quantize(model, feeds)
    assert optimized_op_types(result.model)["QLinearConv"] == 1
    assert any(p.kind == "weight" for p in result.plan.weights)
    assert any(p.kind == "bias" for p in result.plan.weights)


def test_float16_model_keeps_float16_interface() -> None:
    fp32 = builders.conv_net()
    fp16 = onnx.ModelProto()
    fp16.CopyFrom(fp32)
    for t in fp16.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for vi in list(fp16.graph.input) + list(fp16.graph.output):
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    feeds = [{"input": f["input"].astype(np.float16)} for f in builders.calibration(fp32, 8)]
    result = qnnlib.quantize(fp16, feeds)
    session = result.session()
    assert session.get_inputs()[0].type == "tensor(float16)"
    assert session.get_outputs()[0].type == "tensor(float16)"
    out = session.run(None, feeds[0])[0]
    assert out.dtype == np.float16
    ref = run(fp32, {"input": feeds[0]["input"].astype(np.float32)})[0]
    assert sqnr_db(ref, out.astype(np.float32)) > 25
    assert optimized_op_types(result.model)["QLinearConv"] >= 4
    # the input Cast does not hide the model input from the first-layer overflow fix
    first_layer = qnnlib.quantize(fp16, feeds, config=qnnlib.QuantConfig(overflow_fix="first_layer"))
    assert next(w for w in first_layer.plan.weights if w.kind == "weight").qmax == 63


def test_external_data_round_trip(tmp_path: Path, model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
                                  reference: bytes) -> None:
    path = tmp_path / "ext.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(copy, str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = qnnlib.quantize(path, feeds)
    assert result.model.SerializeToString() == reference
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # the user's files are untouched
    out = tmp_path / "out" / "q.onnx"
    result.save(out, external_data=True)
    assert (out.parent / "q.onnx.data").is_file()
    reloaded = load_model(out)  # onnx.load would leave data_location set explicitly on every tensor
    assert reloaded.SerializeToString() == reference
    import onnxruntime as ort

    from_disk = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds[0])[0]
    np.testing.assert_array_equal(from_disk, result.session().run(None, feeds[0])[0])


def test_metadata_and_custom_opsets_survive(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> None:
    rich = onnx.ModelProto()
    rich.CopyFrom(model)
    rich.doc_string = "my model"
    rich.producer_name = "my exporter"
    rich.model_version = 7
    rich.metadata_props.add(key="author", value="someone")
    rich.opset_import.add(domain="com.example.unused", version=3)
    result = qnnlib.quantize(rich, feeds)
    out = result.model
    assert out.doc_string == "my model" and out.producer_name == "my exporter" and out.model_version == 7
    assert {p.key: p.value for p in out.metadata_props}["author"] == "someone"
    assert "qnnlib.version" in {p.key for p in out.metadata_props}
    assert any(op.domain == "com.example.unused" and op.version == 3 for op in out.opset_import)


def test_unsupported_ops_stay_float(feeds: list[dict[str, np.ndarray]]) -> None:
    """Ops without integer kernels (here Erf, TopK, Exp, LSTM-free float math) stay float; nothing crashes."""
    b = builders.GraphBuilder(5)
    c = b.conv("x", 3, 4)
    e = b.op("Erf", [c])
    s = b.op("Exp", [e])  # type: ignore[list-item]
    y = b.conv(s, 4, 4, relu=False)  # type: ignore[arg-type]
    b.nodes[-1].output[0] = "y"
    del y
    m = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])])
    result = qnnlib.quantize(m, builders.calibration(m, 8))
    precisions = {layer.op_type: layer.precision for layer in result.report.layers}
    assert precisions["Erf"] == "float" and precisions["Exp"] == "float" and precisions["Conv"] == "int8"
    assert optimized_op_types(result.model)["QLinearConv"] == 2


def test_exclusion_keeps_nodes_float(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> None:
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    config = qnnlib.QuantConfig(exclude=(convs[0],), exclude_op_types=("Gemm",))
    result = qnnlib.quantize(model, feeds, config=config)
    report = result.report
    assert report.layer(convs[0]).precision == "float"
    assert report.layer(convs[0]).note == "excluded by config"
    assert all(layer.precision == "float" for layer in report.layers if layer.op_type == "Gemm")
    assert report.layer(convs[1]).precision == "int8"
    glob = qnnlib.quantize(model, feeds, config=qnnlib.QuantConfig(exclude=("Conv*",)))
    assert all(layer.precision == "float" for layer in glob.report.layers if layer.op_type == "Conv")


@pytest.mark.parametrize("kind", ["Conv", "Gemm"])
def test_an_excluded_layer_between_quantised_ones_stays_float_in_onnxruntime(kind: str) -> None:
    """onnxruntime quantises the float weights of a Conv or Gemm between DequantizeLinear and QuantizeLinear.

    Its WeightBiasQuantization transformer does so per tensor when the DequantizeLinear's scale is
    a scalar; the excluded layer's DequantizeLinear repeats the scale along the channel axis, so
    the optimised graph keeps it float (before: three QLinearConv, four QGemm).
    """
    b = builders.GraphBuilder(3)
    if kind == "Conv":
        y = b.conv(b.conv(b.conv("x", 3, 4), 4, 4), 4, 2)
        shape, out = [1, 3, 8, 8], [1, 2, 8, 8]
    else:
        t = b.op("Relu", [b.linear("x", 6, 8)])  # read by the excluded Gemm and a quantised one
        joined = b.op("Concat", [b.linear(t, 8, 8), b.linear(t, 8, 8)], axis=1)  # type: ignore[arg-type]
        y = b.linear(joined, 16, 3)  # type: ignore[arg-type]
        shape, out = [1, 6], [1, 3]
    m = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                [helper.make_tensor_value_info(y, TensorProto.FLOAT, out)])
    middle = [n.name for n in m.graph.node if n.op_type in ("Conv", "MatMul")][1]
    result = qnnlib.quantize(m, builders.calibration(m, 8), config=qnnlib.QuantConfig(exclude=(middle,)))
    assert result.report.layer(middle).precision == "float"
    kernels = optimized_op_types(result.model)
    assert kernels["QLinearConv" if kind == "Conv" else "QGemm"] == (2 if kind == "Conv" else 3)
    assert kernels["Conv" if kind == "Conv" else "Gemm"] + kernels["FusedGemm"] == 1


def test_override_fixes_a_group(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> None:
    concat = next(n for n in model.graph.node if n.op_type == "Concat")
    config = qnnlib.QuantConfig(overrides={concat.output[0]: qnnlib.TensorOverride(range=(0.0, 2.55))})
    plan = qnnlib.quantize(model, feeds, config=config).plan
    params = plan.params(concat.input[0])
    assert params.source == "override" and params.scale == pytest.approx(0.01) and params.zero_point == 0
    exact = qnnlib.QuantConfig(overrides={concat.output[0]: qnnlib.TensorOverride(scale=0.05, zero_point=3)})
    params = qnnlib.quantize(model, feeds, config=exact).plan.params(concat.output[0])
    assert (params.scale, params.zero_point) == (pytest.approx(0.05), 3)


def test_int8_activations(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> None:
    result = qnnlib.quantize(model, feeds, config=qnnlib.QuantConfig(activation_type="int8", activation_symmetric=True))
    assert all(g.params.zero_point == 0 and g.params.qtype == "int8" for g in result.plan.groups)
    assert result.report.outputs[0].sqnr_db > 25


def test_nothing_written_to_working_directory(tmp_path: Path, model: onnx.ModelProto,
                                              feeds: list[dict[str, np.ndarray]]) -> None:
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        qnnlib.quantize(model, iter(feeds))
        qnnlib.quantize(model, None)
    finally:
        os.chdir(cwd)
    assert list(tmp_path.iterdir()) == []


def _bad_third_sample(feeds: list[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    yield from feeds[:2]
    yield {"input": np.full_like(feeds[0]["input"], np.nan)}


@pytest.mark.parametrize("case", ["success", "bad sample after spooling", "strict threshold", "large-model path"])
def test_temporary_files_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: onnx.ModelProto,
                                     feeds: list[dict[str, np.ndarray]], case: str) -> None:
    """Whatever happens, qnnlib leaves nothing in the temp directory (nor the working directory).

    A one-shot generator is spooled to a temp directory; models past the external-data threshold go
    to onnxruntime through one; each case below passes through those paths and ends as it says.
    """
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.chdir(tmp_path)
    if case == "success":
        qnnlib.quantize(model, iter(feeds), config=qnnlib.QuantConfig(threshold=qnnlib.Threshold(metric="sqnr", min=1)))
    elif case == "bad sample after spooling":
        with pytest.raises(qnnlib.CalibrationDataError, match="sample 2"):
            qnnlib.quantize(model, _bad_third_sample(feeds))
    elif case == "strict threshold":
        strict = qnnlib.Threshold(metric="max_abs", max=0.0, strict=True)
        with pytest.raises(qnnlib.ThresholdError):
            qnnlib.quantize(model, iter(feeds), config=qnnlib.QuantConfig(threshold=strict, precisions=("int8",)))
    else:
        monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
        monkeypatch.setattr(model_io, "SESSION_FILE_BYTES", 1000)
        qnnlib.quantize(model, iter(feeds)).session()
    assert list(temp.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["temp"]


def test_unconvertible_old_opset_falls_back_to_per_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    """When onnx's converter fails on an opset-10..12 model, weights are quantised per tensor (allowed there)."""
    old = _old_opset_model(11)

    def refuse(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
        raise RuntimeError("no adapter for this op")

    monkeypatch.setattr(onnx.version_converter, "convert_version", refuse)
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 2, 8, 8)).astype(np.float32)} for i in range(8)]
    result = qnnlib.quantize(old, feeds)
    onnx.checker.check_model(result.model)
    assert next(op.version for op in result.model.opset_import if op.domain == "") == 11
    assert not any(a.name == "axis" for n in result.model.graph.node for a in n.attribute)
    assert all(len(w.scales) == 1 for w in result.plan.weights if w.kind == "weight")
    assert any("per tensor" in note for note in result.report.notes)
    assert optimized_op_types(result.model)["QLinearConv"] == 2


def test_unconvertible_ancient_opset_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
        raise RuntimeError("no adapter for this op")

    monkeypatch.setattr(onnx.version_converter, "convert_version", refuse)
    with pytest.raises(qnnlib.UnsupportedModelError, match=r"opset 7.*no QuantizeLinear.*convert_version"):
        qnnlib.quantize(_old_opset_model(7), None)


@pytest.mark.parametrize("mode", ["enable", "first_layer", "disable"])
def test_overflow_fix_bounds_weights(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], mode: str) -> None:
    """x86 kernels without VNNI saturate u8 x s8 pair sums past 32767: 255 * 63 * 2 stays below it."""
    result = qnnlib.quantize(model, feeds, config=qnnlib.QuantConfig(overflow_fix=mode))
    weights = [w for w in result.plan.weights if w.kind == "weight"]
    first = weights[0]  # the stem Conv reads the graph input
    expected_first = 127 if mode == "disable" else 63
    expected_rest = 63 if mode == "enable" else 127
    assert first.qmax == expected_first
    assert all(w.qmax == expected_rest for w in weights[1:])
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    q = stored[next(n.input[0] for n in result.model.graph.node if n.op_type == "DequantizeLinear"
                    and n.output[0] in {i for c in result.model.graph.node if c.op_type == "Conv" for i in c.input}
                    and n.input[0] in stored and stored[n.input[0]].dtype == np.int8 and stored[n.input[0]].ndim == 4)]
    assert np.abs(q.astype(int)).max() <= 127


def test_overflow_fix_recovers_saturating_layer() -> None:
    """A first layer fed by saturated inputs (a white page) loses its output to u8 x s8 saturation without the fix."""
    b = builders.GraphBuilder(11)
    w = np.full((8, 3, 3, 3), 0.5, np.float32)  # large, same-signed weights: adjacent products add up
    y = b.op("Conv", ["x", b.const(w, "w")], pads=[1, 1, 1, 1])
    b.nodes[-1].output[0] = "y"
    del y
    m = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])])
    rng = np.random.default_rng(0)
    feeds = [{"x": np.where(rng.random((1, 3, 16, 16)) < 0.9, 1.0, -1.0).astype(np.float32)} for _ in range(8)]
    fixed = qnnlib.quantize(m, feeds)
    ref = run(m, feeds[0])[0]
    assert sqnr_db(ref, fixed.session().run(None, feeds[0])[0]) > 30
    assert fixed.report.outputs[0].sqnr_db > 30


def test_sequential_and_pipelined_calibration_agree(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
                                                    reference: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above PIPELINE_BYTES per sample the pass runs one sample at a time; the result is the same."""
    from qnnlib.calibration import collect

    monkeypatch.setattr(collect, "PIPELINE_BYTES", 1)
    assert qnnlib.quantize(model, iter(feeds)).model.SerializeToString() == reference


def test_metadata_survives_opset_upgrade() -> None:
    old = _old_opset_model(9)
    old.doc_string = "old model"
    old.metadata_props.add(key="source", value="exporter x")
    old.opset_import.add(domain="com.example.unused", version=2)
    result = qnnlib.quantize(old, None)
    out = result.model
    assert out.doc_string == "old model"
    assert {p.key: p.value for p in out.metadata_props}["source"] == "exporter x"
    assert any(op.domain == "com.example.unused" for op in out.opset_import)


# -- large models: nothing serialised or copied whole -------------------------------------------
@pytest.mark.parametrize("build", [builders.conv_net, builders.transformer_block])
def test_shape_inference_on_the_skeleton_equals_inference_on_the_model(build) -> None:  # type: ignore[no-untyped-def]
    model = build()
    full = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    light = onnx.shape_inference.infer_shapes(model_io.skeleton(model), check_type=False, strict_mode=False,
                                              data_prop=True)
    assert list(light.graph.value_info) == list(full.graph.value_info)
    assert list(light.graph.output) == list(full.graph.output)
    assert sum(model_io.tensor_bytes(t) for t in light.graph.initializer) <= 4096 * len(light.graph.initializer)


def test_external_data_writer_leaves_the_model_alone(tmp_path: Path, model: onnx.ModelProto,
                                                     feeds: list[dict[str, np.ndarray]]) -> None:
    before = model.SerializeToString()
    path = tmp_path / "written.onnx"
    model_io.write_with_external_data(model, path, extra_outputs=[model.graph.node[0].output[0]])
    assert model.SerializeToString() == before
    large = [model_io.tensor_bytes(t) for t in model.graph.initializer if model_io.tensor_bytes(t) > 4096]
    assert large and (tmp_path / "written.onnx.data").stat().st_size == sum(large)
    reloaded = load_model(path)
    assert [o.name for o in reloaded.graph.output] == [*(o.name for o in model.graph.output),
                                                       model.graph.node[0].output[0]]
    assert {t.name: numpy_helper.to_array(t).tobytes() for t in reloaded.graph.initializer} == \
        {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}
    np.testing.assert_array_equal(run(reloaded, feeds[0])[0], run(model, feeds[0])[0])


def test_model_size_is_close_to_the_serialised_size(model: onnx.ModelProto) -> None:
    assert model_io.model_size(model) == pytest.approx(model.ByteSize(), rel=0.05)


def test_damaged_weight_data_names_the_initializer(model: onnx.ModelProto) -> None:
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    weight = max(broken.graph.initializer, key=model_io.tensor_bytes)
    weight.raw_data = weight.raw_data[:-4]
    with pytest.raises(qnnlib.InvalidModelError, match=f"initializer '{weight.name}' has .* bytes"):
        qnnlib.quantize(broken, None)
